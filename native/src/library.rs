//! proxy-wasm SDK plugins built as native shared libraries (`cdylib`), loaded at run time.
//!
//! The plugin is the unmodified source a Wasm build uses, built for the host target. Its
//! `proxy_*` imports bind to the executable's symbols ([`crate::symbols`]). The SDK keeps each
//! plugin's state in the library's own statics and thread-locals, so two VMs must not share a
//! loaded library: every instance loads a private copy (the dynamic loader returns the same
//! library for the same path) of the bytes read when the library was opened, and stays on the
//! thread that created it.
//!
//! Dropping an instance closes its copy, but the copy stays mapped (measured: about 200 KiB per
//! instance started and dropped on one thread), as glibc does not unload a library whose
//! thread-locals registered destructors (the SDK's do) on a thread that still runs: instances
//! are meant to be created once per worker thread, not per request.

use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_LAZY, RTLD_LOCAL, RTLD_NOW};
use runtime_api::{Error, Export, FunctionType, Import, Trap, TrapKind};
use runtime_null::{NativeInstance, NativeModule};

use crate::callbacks::{function_export, memory_export, Shape, ABI_MARKERS, CALLBACKS};

/// A native proxy-wasm SDK plugin library, as a module for the null runtime.
pub struct SdkLibrary {
    path: PathBuf,
    /// The library as it was when opened: every instance loads a copy of these bytes, not of
    /// the file, so that one replaced on disk meanwhile (a new build being deployed, a file
    /// caught half-written) never runs unchecked, nor two builds side by side.
    bytes: Arc<Vec<u8>>,
    exports: Vec<Export>,
    /// The C type of each function export, in export order (`None` for the memory).
    shapes: Vec<Option<Shape>>,
}

impl SdkLibrary {
    /// The library whose `bytes` were read from `path` (which names it in messages and in the
    /// private copies' names), with its Proxy-Wasm exports. The embedder reads the file (as a
    /// regular file, within a size limit: `lifecycle::files` does), so that one file is read
    /// the same way whoever names it.
    ///
    /// Fails if it is not a loadable shared library, if it imports a host function this host
    /// does not define, or if it exports no Proxy-Wasm ABI version marker (then it is not a
    /// Proxy-Wasm plugin).
    ///
    /// # Safety
    /// Loading a library runs its initialisers, and calling it later runs its code in this
    /// process with no sandbox: the library must be a trusted Proxy-Wasm plugin.
    pub unsafe fn from_bytes(path: &Path, bytes: Arc<Vec<u8>>) -> Result<Self, Error> {
        crate::symbols::keep_symbols();
        // Read before loading: loading runs a library's initialisers, which a file named by
        // mistake (another library, a program) should not get to run.
        exports_an_abi_marker(&bytes)
            .map_err(|reason| Error::InvalidModule(format!("{}: {reason}", path.display())))?;
        // SAFETY: the caller vouches that the library is trusted; these are its bytes.
        let library = unsafe { load_private_copy(path, &bytes) }?;
        let mut exports = vec![memory_export()];
        let mut shapes = vec![None];
        let mut has_marker = false;
        for marker in ABI_MARKERS {
            if symbol(&library, marker).is_some() {
                exports.push(function_export(marker, FunctionType::default()));
                shapes.push(Some(Shape::Unit));
                has_marker = true;
            }
        }
        if !has_marker {
            return Err(Error::InvalidModule(format!(
                "{} exports no proxy_abi_version_* symbol: not a Proxy-Wasm plugin",
                path.display()
            )));
        }
        for (name, shape) in CALLBACKS {
            if symbol(&library, name).is_some() {
                exports.push(function_export(name, shape.wasm_type()));
                shapes.push(Some(*shape));
            }
        }
        Ok(SdkLibrary {
            path: path.to_path_buf(),
            bytes,
            exports,
            shapes,
        })
    }
}

/// Whether `bytes`, a shared library, exports a `proxy_abi_version_*` symbol (a Proxy-Wasm
/// plugin does); why not otherwise.
fn exports_an_abi_marker(bytes: &[u8]) -> Result<(), String> {
    use object::Object as _;
    let file = object::File::parse(bytes)
        .map_err(|e| format!("not a shared library this host can read ({e})"))?;
    let exports = file
        .exports()
        .map_err(|e| format!("its exported symbols cannot be read ({e})"))?;
    let marked = exports.iter().any(|export| {
        let name = export.name();
        // Mach-O spells C names with a leading underscore.
        let name = name.strip_prefix(b"_").unwrap_or(name);
        name.starts_with(b"proxy_abi_version_")
    });
    match marked {
        true => Ok(()),
        false => Err("exports no proxy_abi_version_* symbol: not a Proxy-Wasm plugin".into()),
    }
}

/// Loads a private copy of `bytes`, the library read from `original` ([`PrivateCopy`]). A memory
/// file the loader cannot open (a security module may refuse paths under `/proc`) is tried
/// again as a file on disk, whose error, if it fails too, is the one reported (the memory
/// copy's, if no file can be made).
///
/// # Safety
/// As [`SdkLibrary::from_bytes`].
unsafe fn load_private_copy(original: &Path, bytes: &[u8]) -> Result<Library, Error> {
    let copy = PrivateCopy::new(original, bytes)?;
    // SAFETY: the caller's promise.
    let loaded = unsafe { load(copy.path(), original) };
    #[cfg(target_os = "linux")]
    if loaded.is_err() && matches!(copy, PrivateCopy::Memory { .. }) {
        let name = original.file_name().map_or_else(
            || "plugin.so".into(),
            |name| name.to_string_lossy().into_owned(),
        );
        // Without a copy on disk either (no usable temporary directory), the memory copy's
        // reason stands: it may be the library's own (an undefined symbol).
        if let Ok(on_disk) = PrivateCopy::on_disk(original, &name, bytes) {
            // SAFETY: the caller's promise; the same bytes.
            return unsafe { load(on_disk.path(), original) };
        }
    }
    // The mapping stays when the copy goes: the file is no longer needed.
    loaded
}

/// Loads `copy`, a private copy of `library`, binding every symbol now so that a missing host
/// function is an error here rather than an abort at its first call; errors name `library`.
///
/// # Safety
/// As [`SdkLibrary::from_bytes`].
unsafe fn load(copy: &Path, library: &Path) -> Result<Library, Error> {
    make_host_symbols_global();
    // SAFETY: the caller vouches that the library is trusted.
    unsafe { Library::open(Some(copy), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| {
        // libloading's message is only "dlopen failed"; the loader's own is its source.
        let reason = std::error::Error::source(&e).map_or(e.to_string(), ToString::to_string);
        let hint = match reason.contains("undefined symbol: proxy_") {
            true => format!(
                " (this host does not export the proxy_* functions: an executable embedding \
                 the null runtime links with `{}`)",
                crate::LINK_ARG
            ),
            false => String::new(),
        };
        // The private copy's name is the loader's; the user knows the library by its own.
        let reason = reason.replace(&copy.display().to_string(), &library.display().to_string());
        Error::InvalidModule(format!("cannot load {}: {reason}{hint}", library.display()))
    })
}

/// Makes the `proxy_*` symbols this host defines visible to the plugin libraries it loads,
/// which find them in the global scope. An executable's exported symbols are there; a host
/// that is itself a library opened without `RTLD_GLOBAL` (Traffic Server opens
/// `pwhost_ats.so` so) keeps its own local, and every plugin library would fail to load with
/// an undefined `proxy_*` symbol. Opening the object that defines them again with
/// `RTLD_NOLOAD | RTLD_GLOBAL` moves it into the global scope; done once per process.
fn make_host_symbols_global() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
        let defined_here = crate::symbols::proxy_log as *const libc::c_void;
        // SAFETY: `dladdr` only reads the loader's tables for an address of this process (a
        // function of this object) and fills `info`, which it may leave partly unset: it was
        // zeroed, and is read only when `dladdr` reports success.
        let found = unsafe { libc::dladdr(defined_here, info.as_mut_ptr()) };
        if found == 0 {
            return;
        }
        // SAFETY: `dladdr` succeeded, so `info` is filled (zeroed fields stay valid: null
        // pointers).
        let info = unsafe { info.assume_init() };
        if info.dli_fname.is_null() {
            return;
        }
        // SAFETY: `dli_fname` is the loader's NUL-terminated name of an object loaded now.
        let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
        let path = Path::new(std::ffi::OsStr::from_bytes(name.to_bytes()));
        // SAFETY: with `RTLD_NOLOAD` nothing new is loaded and no initialiser runs: only the
        // scope of an object already loaded changes (the main program is not found by its
        // path, and stays as it is). The handle is kept, not closed: the object stays loaded
        // for the life of the process either way.
        if let Ok(library) =
            unsafe { Library::open(Some(path), RTLD_LAZY | libc::RTLD_NOLOAD | RTLD_GLOBAL) }
        {
            std::mem::forget(library);
        }
    });
}

/// The address of `name` defined by `library` itself, if any.
///
/// `dlsym` also searches the library's dependencies, so a symbol the plugin does not define
/// (such as `malloc`) could resolve to libc's; callers only look up Proxy-Wasm names.
fn symbol(library: &Library, name: &str) -> Option<*const ()> {
    // SAFETY: the symbol is read as an untyped address; it is called only through
    // `Shape::call`, whose C type the Proxy-Wasm ABI fixes for this name.
    let symbol = unsafe { library.get::<*const ()>(name.as_bytes()) }.ok()?;
    let address = *symbol;
    (!address.is_null()).then_some(address)
}

impl NativeModule for SdkLibrary {
    fn imports(&self) -> &[Import] {
        crate::host_imports::imports()
    }

    fn exports(&self) -> &[Export] {
        &self.exports
    }

    fn instantiate(&self) -> Result<Box<dyn NativeInstance>, Error> {
        // SAFETY: `from_bytes` loaded these same bytes under the caller's promise that they
        // are trusted.
        let library = unsafe { load_private_copy(&self.path, &self.bytes) }?;
        let functions = self
            .exports
            .iter()
            .zip(&self.shapes)
            .map(|(export, shape)| match shape {
                Some(shape) => symbol(&library, &export.name)
                    .map(|address| Some((*shape, address)))
                    .ok_or_else(|| {
                        Error::Instantiation(format!("{} changed while loading", export.name))
                    }),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Box::new(SdkInstance {
            functions,
            thread: thread_marker(),
            _library: Arc::new(library),
        }))
    }
}

/// A library's bytes in a file of their own, for the dynamic loader to open (it loads a path
/// once: the same path again would return the library already loaded).
///
/// On Linux the file is an anonymous memory file (`memfd_create`), sealed once written and
/// opened through `/proc/self/fd`: nothing is written to disk, and a temporary directory
/// mounted `noexec` (a common hardening, which refuses to map a library from it) does not
/// stop the plugin. Elsewhere, or where that cannot be done (no `/proc`), it is a new file in
/// the temporary directory (never an existing file: another user of that directory cannot put
/// one in its place), removed on drop.
enum PrivateCopy {
    #[cfg(target_os = "linux")]
    Memory {
        /// Open until the library is loaded: closing it would free the file.
        _file: std::fs::File,
        /// `/proc/self/fd/N`.
        path: PathBuf,
    },
    Disk(tempfile::TempPath),
}

impl PrivateCopy {
    /// Writes `bytes`, the library read from `original`, to a new file: in memory where it can
    /// be, else on disk.
    fn new(original: &Path, bytes: &[u8]) -> Result<Self, Error> {
        let name = original
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin.so".into());
        #[cfg(target_os = "linux")]
        if Path::new("/proc/self/fd").is_dir() {
            // Any failure here (sealing refused, an old kernel) leaves the file on disk.
            if let Some(copy) =
                memory_file(&name).and_then(|file| Self::in_memory(file, bytes).ok())
            {
                return Ok(copy);
            }
        }
        Self::on_disk(original, &name, bytes)
    }

    /// `bytes` in a new file of the temporary directory.
    fn on_disk(original: &Path, name: &str, bytes: &[u8]) -> Result<Self, Error> {
        let failed = |e: std::io::Error| {
            Error::Instantiation(format!("cannot copy {}: {e}", original.display()))
        };
        let mut file = tempfile::Builder::new()
            .prefix(&format!("pwhost-{}-", std::process::id()))
            .suffix(&format!("-{name}"))
            .tempfile()
            .map_err(failed)?;
        file.write_all(bytes).map_err(failed)?;
        Ok(PrivateCopy::Disk(file.into_temp_path()))
    }

    /// `bytes` in the memory file `file`, sealed: from then on no one holding the file can
    /// change what the loader maps.
    #[cfg(target_os = "linux")]
    fn in_memory(mut file: std::fs::File, bytes: &[u8]) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd as _;
        file.write_all(bytes)?;
        let seals =
            libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        // SAFETY: `fcntl` with `F_ADD_SEALS` takes an int argument and only changes the seals
        // of this process's own open file; no memory is passed.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } == -1 {
            return Err(std::io::Error::last_os_error());
        }
        let path = never_loaded_name(file.as_raw_fd());
        Ok(PrivateCopy::Memory { _file: file, path })
    }

    fn path(&self) -> &Path {
        match self {
            #[cfg(target_os = "linux")]
            PrivateCopy::Memory { path, .. } => path,
            PrivateCopy::Disk(path) => path,
        }
    }
}

/// A name under which the loader has loaded nothing yet for the memory file open as `fd`.
///
/// The loader returns the library it already has under a name it knows, and the name of a
/// copy closed since can outlive it (glibc keeps a library whose thread-locals registered
/// destructors), while file descriptor numbers are reused: `/proc/self/fd/7` could bring back
/// another plugin. The kernel reads `/proc/self/fd/./7` and `/proc/self/fd//7` as
/// `/proc/self/fd/7`, so each copy's sequence number, written in binary as `/.` (1) and `/`
/// (0) steps, makes its name new.
#[cfg(target_os = "linux")]
fn never_loaded_name(fd: std::os::fd::RawFd) -> PathBuf {
    static COPIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let number = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = String::from("/proc/self/fd");
    for bit in (0..u64::BITS - number.leading_zeros()).rev() {
        name.push_str(if (number >> bit) & 1 == 1 { "/." } else { "/" });
    }
    name.push_str(&format!("/{fd}"));
    PathBuf::from(name)
}

/// A new anonymous memory file named after the library (the name shows in `/proc/PID/maps`),
/// closed on `exec`; `None` if the kernel has none to give.
#[cfg(target_os = "linux")]
fn memory_file(name: &str) -> Option<std::fs::File> {
    use std::os::fd::FromRawFd as _;
    let name = std::ffi::CString::new(format!("pwhost-{name}")).ok()?;
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // Executable said so (Linux 6.3 warns of a memory file made without saying, and may be set
    // to make such files non-executable); a kernel older than the flag refuses it: without.
    // SAFETY: `name` is a NUL-terminated string that outlives the calls; the kernel copies it.
    let mut fd = unsafe { libc::memfd_create(name.as_ptr(), flags | libc::MFD_EXEC) };
    if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // SAFETY: as above.
        fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    }
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new file descriptor this process owns and nothing else refers to.
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// An identity of the current thread that is cheap to read: a number drawn once per thread
/// from a process-wide counter, so never reused. (`std::thread::current().id()` clones a
/// reference-counted handle on every call; a thread-local's address is reused by a later
/// thread whose stack or TLS block lands where an ended thread's was.)
fn thread_marker() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    thread_local! {
        static MARKER: u64 = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    MARKER.with(|marker| *marker)
}

/// One loaded copy of an SDK library.
struct SdkInstance {
    /// Per export: its C type and address, or `None` for the memory.
    functions: Vec<Option<(Shape, *const ())>>,
    /// The thread that created the instance ([`thread_marker`]): the SDK keeps the plugin's
    /// contexts in thread-locals, so on another thread it would find none.
    thread: u64,
    /// Keeps the code mapped while the addresses above are in use. Never unloaded before the
    /// instance, whose calls are the only users of the addresses.
    _library: Arc<Library>,
}

// SAFETY: the raw function addresses point into `_library`, which the instance owns; they are
// plain code addresses with no thread affinity of their own. The SDK's thread-local state is
// guarded by the thread check in `call`, so moving the instance to another thread can at worst
// make its calls fail.
unsafe impl Send for SdkInstance {}

impl NativeInstance for SdkInstance {
    fn call(&self, index: u32, args: &[u64], results: &mut [u64]) -> Result<(), Trap> {
        if thread_marker() != self.thread {
            return Err(Trap::new(
                TrapKind::BadCall,
                "a native proxy-wasm SDK plugin keeps its state in thread-locals: \
                 call it only on the thread that created its VM",
            ));
        }
        let Some(Some((shape, address))) = self.functions.get(index as usize) else {
            return Err(Trap::new(TrapKind::BadCall, "no such function"));
        };
        if (args.len(), results.len()) != shape.arity() {
            return Err(Trap::new(TrapKind::BadCall, "wrong number of arguments"));
        }
        // SAFETY: `address` was found under a name whose C type the ABI fixes as `shape`
        // (the plugin is trusted to follow the ABI), and the slot counts were just checked.
        unsafe { shape.call(*address, args, results) };
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn each_private_copy_has_a_name_of_its_own_for_the_same_file_descriptor() {
        let copy = PrivateCopy::new(Path::new("/plugins/libx.so"), b"bytes").unwrap();
        let PrivateCopy::Memory {
            ref _file,
            ref path,
        } = copy
        else {
            panic!("a memory file on Linux");
        };
        use std::os::fd::AsRawFd as _;
        let fd = _file.as_raw_fd();
        let names: Vec<PathBuf> = (0..40).map(|_| never_loaded_name(fd)).collect();
        // Told apart as the loader tells names apart: as strings (`Path` equality would not).
        let unique: std::collections::HashSet<&std::ffi::OsStr> = names
            .iter()
            .chain([path])
            .map(|name| name.as_os_str())
            .collect();
        assert_eq!(unique.len(), 41, "{names:?}");
        // Each is the same file to the kernel, sealed against writes.
        for name in names.iter().chain([path]) {
            assert_eq!(std::fs::read(name).unwrap(), b"bytes", "{}", name.display());
        }
        let written = std::fs::OpenOptions::new().write(true).open(path);
        assert!(written.is_err() || written.unwrap().write_all(b"x").is_err());
    }
}
