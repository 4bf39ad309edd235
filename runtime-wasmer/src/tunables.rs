//! The memory cap: wasmer's base tunables with every linear memory's maximum lowered to the cap.

use std::ptr::NonNull;

use wasmer::sys::vm::{
    MemoryStyle, TableStyle, VMMemory, VMMemoryDefinition, VMTable, VMTableDefinition,
};
use wasmer::sys::{BaseTunables, Tunables};
use wasmer::{MemoryError, MemoryType, Pages, TableType, WASM_PAGE_SIZE};

/// The most pages a 32-bit linear memory can have.
const MAX_PAGES: u64 = 65536;

/// The most elements one table may grow to. wasmer grows tables with an infallible `Vec`
/// resize, so a guest's `table.grow` by billions of elements would abort the process. (A
/// module compiled here has its tables bounded in all before, `runtime_api::binary::bound_tables`;
/// this bounds each table of a precompiled one too.)
pub(crate) const MAX_TABLE_ELEMENTS: u32 = runtime_api::MAX_TABLE_ENTRIES as u32;

/// `ty` with its maximum lowered to [`MAX_TABLE_ELEMENTS`]; an error if even its minimum is
/// larger (wasmer would fill that many elements at once).
fn capped_table(ty: &TableType) -> Result<TableType, String> {
    if ty.minimum > MAX_TABLE_ELEMENTS {
        return Err(format!(
            "table minimum size of {} elements exceeds the limit of {MAX_TABLE_ELEMENTS}",
            ty.minimum
        ));
    }
    Ok(TableType {
        maximum: Some(
            ty.maximum
                .map_or(MAX_TABLE_ELEMENTS, |max| max.min(MAX_TABLE_ELEMENTS)),
        ),
        ..*ty
    })
}

/// [`BaseTunables`] with an optional cap on the size of each linear memory.
///
/// Memory and table styles are the base ones, so code compiled with or without a cap (or loaded
/// from a precompiled artifact) runs under either. Public so that other hosts on raw wasmer
/// (the benchmarks' floor) run under exactly pwhost's memory settings.
pub struct CappedTunables {
    base: BaseTunables,
    /// The most pages one memory may have; `None` leaves the module's own maximum.
    max_pages: Option<u32>,
}

impl CappedTunables {
    /// wasmer's base tunables with every linear memory capped at `max_memory_bytes` (rounded
    /// down to whole pages) and tables at 2^20 elements; `None`: no memory cap.
    pub fn new(max_memory_bytes: Option<u64>) -> Self {
        CappedTunables {
            base: BaseTunables::new(),
            // A 32-bit memory has at most 65536 pages; wasmer refuses a larger maximum.
            max_pages: max_memory_bytes
                .map(|bytes| (bytes / WASM_PAGE_SIZE as u64).min(MAX_PAGES) as u32),
        }
    }

    /// `ty` with its maximum lowered to the cap; an error if even its minimum exceeds the cap.
    fn capped(&self, ty: &MemoryType) -> Result<MemoryType, MemoryError> {
        let Some(cap) = self.max_pages else {
            return Ok(*ty);
        };
        if ty.minimum.0 > cap {
            return Err(MemoryError::MinimumMemoryTooLarge {
                min_requested: ty.minimum,
                max_allowed: Pages(cap),
            });
        }
        let maximum = match ty.maximum {
            Some(max) if max.0 <= cap => max,
            _ => Pages(cap),
        };
        Ok(MemoryType {
            maximum: Some(maximum),
            ..*ty
        })
    }
}

impl Tunables for CappedTunables {
    fn memory_style(&self, memory: &MemoryType) -> MemoryStyle {
        self.base.memory_style(memory)
    }

    fn table_style(&self, table: &TableType) -> TableStyle {
        self.base.table_style(table)
    }

    fn create_host_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
    ) -> Result<VMMemory, MemoryError> {
        self.base.create_host_memory(&self.capped(ty)?, style)
    }

    unsafe fn create_vm_memory(
        &self,
        ty: &MemoryType,
        style: &MemoryStyle,
        vm_definition_location: NonNull<VMMemoryDefinition>,
    ) -> Result<VMMemory, MemoryError> {
        let ty = self.capped(ty)?;
        // SAFETY: forwarded unchanged from wasmer, which upholds `create_vm_memory`'s contract.
        unsafe {
            self.base
                .create_vm_memory(&ty, style, vm_definition_location)
        }
    }

    fn create_host_table(&self, ty: &TableType, style: &TableStyle) -> Result<VMTable, String> {
        self.base.create_host_table(&capped_table(ty)?, style)
    }

    unsafe fn create_vm_table(
        &self,
        ty: &TableType,
        style: &TableStyle,
        vm_definition_location: NonNull<VMTableDefinition>,
    ) -> Result<VMTable, String> {
        let ty = capped_table(ty)?;
        // SAFETY: forwarded unchanged from wasmer, which upholds `create_vm_table`'s contract.
        unsafe {
            self.base
                .create_vm_table(&ty, style, vm_definition_location)
        }
    }
}
