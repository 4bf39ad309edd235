//! Bounds-checked access to a guest's linear memory.

use std::marker::PhantomData;

/// A guest pointer and length that do not lie inside the guest's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest memory access out of bounds: {len} bytes at {ptr:#x}")]
pub struct MemoryAccessError {
    /// The guest address.
    pub ptr: u64,
    /// The length.
    pub len: u64,
}

/// A view of a guest's memory, valid until the next call into the guest (which may grow, and so
/// move, the memory).
///
/// Every access is checked against the memory's current size; a failed check is an error for the
/// host function to report (Proxy-Wasm's `INVALID_MEMORY_ACCESS`), never a panic.
///
/// Guest addresses are `u64` so that the same code serves 32-bit Wasm pointers (zero-extended) and
/// the null runtime's native pointers.
pub struct GuestMemory<'a> {
    base: *mut u8,
    len: usize,
    /// Addresses are absolute native addresses (null runtime); `base` is unused.
    native: bool,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> GuestMemory<'a> {
    /// A view of a Wasm linear memory.
    #[inline]
    pub fn new(memory: &'a mut [u8]) -> Self {
        GuestMemory {
            base: memory.as_mut_ptr(),
            len: memory.len(),
            native: false,
            _borrow: PhantomData,
        }
    }

    /// A guest without a memory: every non-empty access fails.
    #[inline]
    pub fn empty() -> Self {
        GuestMemory {
            base: std::ptr::NonNull::dangling().as_ptr(),
            len: 0,
            native: false,
            _borrow: PhantomData,
        }
    }

    /// The process address space, for native plugins that pass native pointers.
    ///
    /// # Safety
    /// Accesses through this view are not bounds-checked: the caller promises that every
    /// pointer/length pair the plugin passes is valid for the access, which holds only for
    /// trusted native plugin code.
    #[inline]
    pub unsafe fn native() -> Self {
        GuestMemory {
            base: std::ptr::null_mut(),
            len: usize::MAX,
            native: true,
            _borrow: PhantomData,
        }
    }

    /// The memory size in bytes (`usize::MAX` for the native address space).
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the memory has no bytes.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn checked(&self, ptr: u64, len: u64) -> Result<*mut u8, MemoryAccessError> {
        let err = MemoryAccessError { ptr, len };
        if self.native {
            if len > isize::MAX as u64 || (ptr == 0 && len != 0) {
                return Err(err);
            }
            return Ok(std::ptr::with_exposed_provenance_mut(ptr as usize));
        }
        let end = ptr.checked_add(len).ok_or(err)?;
        if end > self.len as u64 {
            return Err(err);
        }
        // In bounds: `ptr <= end <= len` and `len` fits in usize.
        Ok(self.base.wrapping_add(ptr as usize))
    }

    /// The `len` bytes at `ptr`.
    #[inline]
    pub fn slice(&self, ptr: u64, len: u64) -> Result<&[u8], MemoryAccessError> {
        if len == 0 {
            return Ok(&[]);
        }
        let start = self.checked(ptr, len)?;
        // SAFETY: `checked` verified `ptr..ptr+len` lies inside the memory this view borrows
        // (or, for the native view, the caller of `native()` vouched for the plugin's pointers).
        Ok(unsafe { std::slice::from_raw_parts(start, len as usize) })
    }

    /// The `len` bytes at `ptr`, writable.
    #[inline]
    pub fn slice_mut(&mut self, ptr: u64, len: u64) -> Result<&mut [u8], MemoryAccessError> {
        if len == 0 {
            return Ok(&mut []);
        }
        let start = self.checked(ptr, len)?;
        // SAFETY: as in `slice`; `&mut self` makes this the only live borrow of the view.
        Ok(unsafe { std::slice::from_raw_parts_mut(start, len as usize) })
    }

    /// Copies `bytes` to `ptr`.
    #[inline]
    pub fn write(&mut self, ptr: u64, bytes: &[u8]) -> Result<(), MemoryAccessError> {
        self.slice_mut(ptr, bytes.len() as u64)?
            .copy_from_slice(bytes);
        Ok(())
    }

    /// Reads a little-endian `u32` at `ptr`.
    #[inline]
    pub fn read_u32(&self, ptr: u64) -> Result<u32, MemoryAccessError> {
        let bytes = self.slice(ptr, 4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// Writes a little-endian `u32` at `ptr`.
    #[inline]
    pub fn write_u32(&mut self, ptr: u64, value: u32) -> Result<(), MemoryAccessError> {
        self.write(ptr, &value.to_le_bytes())
    }

    /// Writes a little-endian `u64` at `ptr`.
    #[inline]
    pub fn write_u64(&mut self, ptr: u64, value: u64) -> Result<(), MemoryAccessError> {
        self.write(ptr, &value.to_le_bytes())
    }

    /// The size of a guest pointer or `usize`: 4 bytes for Wasm, 8 for native plugins.
    #[inline]
    pub fn pointer_size(&self) -> u64 {
        if self.native {
            8
        } else {
            4
        }
    }

    /// Writes a guest pointer at `ptr`: 4 bytes for Wasm, 8 for native plugins.
    #[inline]
    pub fn write_pointer(&mut self, ptr: u64, value: u64) -> Result<(), MemoryAccessError> {
        if self.native {
            self.write_u64(ptr, value)
        } else {
            self.write_u32(ptr, value as u32)
        }
    }

    /// Writes a guest size (`usize` in the guest): 4 bytes for Wasm, 8 for native plugins.
    #[inline]
    pub fn write_size(&mut self, ptr: u64, value: u64) -> Result<(), MemoryAccessError> {
        self.write_pointer(ptr, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_inside_memory_succeed() {
        let mut bytes = vec![0u8; 16];
        let mut memory = GuestMemory::new(&mut bytes);
        memory.write(4, b"abcd").unwrap();
        assert_eq!(memory.slice(4, 4).unwrap(), b"abcd");
        assert_eq!(memory.read_u32(4).unwrap(), u32::from_le_bytes(*b"abcd"));
        memory.write_u32(12, 7).unwrap();
        assert_eq!(memory.read_u32(12).unwrap(), 7);
    }

    #[test]
    fn accesses_past_the_end_or_overflowing_fail() {
        let mut bytes = vec![0u8; 16];
        let mut memory = GuestMemory::new(&mut bytes);
        assert!(memory.slice(13, 4).is_err());
        assert!(memory.slice(16, 1).is_err());
        assert!(memory.slice(u64::MAX, 2).is_err());
        assert!(memory.slice(1, u64::MAX).is_err());
        assert!(memory.write(0xffff_fff0, b"x").is_err());
        assert!(memory.read_u32(14).is_err());
    }

    #[test]
    fn empty_accesses_succeed_anywhere() {
        let memory = GuestMemory::empty();
        assert_eq!(memory.slice(12345, 0).unwrap(), b"");
        assert!(memory.slice(0, 1).is_err());
    }
}
