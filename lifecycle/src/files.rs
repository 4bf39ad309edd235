//! Reading a proxy's configuration and code files without trusting what the path names.
//!
//! A proxy reads these files at start and again at every reload, on a thread that serves or
//! that holds the reload: a path naming a FIFO would block it for ever (and with it every
//! later reload), and one naming a device or a huge file would exhaust memory. So only regular
//! files are read, up to a limit.

use std::io::Read as _;
use std::path::Path;

/// The largest configuration or code file read (as the largest remote code fetched,
/// [`crate::remote::MAX_REMOTE_CODE_BYTES`]).
pub const MAX_FILE_BYTES: u64 = 128 << 20;

/// The bytes of `path`, a regular file of at most [`MAX_FILE_BYTES`]. The file is opened
/// without waiting (a FIFO in its place would block the open) and checked on the open file, so
/// nothing can be swapped in between; anything else is an error saying what it is.
pub fn read_regular_file(path: &Path) -> std::io::Result<Vec<u8>> {
    read_regular_file_up_to(path, MAX_FILE_BYTES)
}

/// [`read_regular_file`] with a limit of `limit` bytes.
pub fn read_regular_file_up_to(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    read_checked(path, limit, Links::Follow, |_| Ok(())).map(|(bytes, _)| bytes)
}

/// Whether the last component of a path may be a symbolic link.
pub(crate) enum Links {
    /// Followed to the file it names.
    Follow,
    /// Refused (the open fails).
    Refuse,
}

/// [`read_regular_file_up_to`], following a final symbolic link or not, and with `check` of
/// the open file's metadata before anything is read; with the file still open, for what the
/// caller does to that very file next.
pub(crate) fn read_checked(
    path: &Path,
    limit: u64,
    links: Links,
    check: impl FnOnce(&std::fs::Metadata) -> std::io::Result<()>,
) -> std::io::Result<(Vec<u8>, std::fs::File)> {
    use std::io::{Error, ErrorKind};
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        match links {
            Links::Follow => libc::O_NONBLOCK,
            Links::Refuse => libc::O_NONBLOCK | libc::O_NOFOLLOW,
        },
    );
    #[cfg(not(unix))]
    let _ = links;
    let file = options.open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("not a regular file ({})", kind_of(&metadata)),
        ));
    }
    let too_large = || {
        Error::new(
            ErrorKind::InvalidData,
            format!("larger than {} MiB", limit >> 20),
        )
    };
    if metadata.len() > limit {
        return Err(too_large());
    }
    check(&metadata)?;
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    // The file may grow while it is read: at most one byte past the limit is taken.
    (&file)
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok((bytes, file))
}

/// [`read_regular_file`] of a UTF-8 text file.
pub fn read_regular_text_file(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_regular_file(path)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()))
}

/// What a file that is not a regular one is, for the error.
fn kind_of(metadata: &std::fs::Metadata) -> &'static str {
    let kind = metadata.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if kind.is_fifo() {
            return "a FIFO";
        }
        // (A socket cannot be opened at all: its open fails first.)
        if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
    }
    if kind.is_dir() {
        return "a directory";
    }
    "not a plain file"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_read_whole() {
        let dir = tempfile::tempdir().expect("a directory");
        let path = dir.path().join("plugin.yaml");
        std::fs::write(&path, "config: {}\n").expect("written");
        assert_eq!(read_regular_text_file(&path).expect("read"), "config: {}\n");
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().expect("a directory");
        let path = dir.path().join("fifo");
        let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL");
        // SAFETY: `name` is a NUL-terminated path that lives through the call.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo");
        let error = read_regular_file(&path).expect_err("a FIFO is no file to read");
        assert_eq!(error.to_string(), "not a regular file (a FIFO)");
    }

    #[test]
    fn a_device_or_a_directory_is_refused() {
        let error = read_regular_file(Path::new("/dev/zero")).expect_err("a device");
        assert_eq!(error.to_string(), "not a regular file (a device)");
        let dir = tempfile::tempdir().expect("a directory");
        let error = read_regular_file(dir.path()).expect_err("a directory");
        assert_eq!(error.to_string(), "not a regular file (a directory)");
    }

    #[test]
    fn a_file_over_the_limit_is_refused() {
        let dir = tempfile::tempdir().expect("a directory");
        let path = dir.path().join("big.wasm");
        std::fs::write(&path, vec![0u8; 2 << 20]).expect("written");
        let error = read_regular_file_up_to(&path, 1 << 20).expect_err("over the limit");
        assert_eq!(error.to_string(), "larger than 1 MiB");
        assert_eq!(
            read_regular_file_up_to(&path, 2 << 20)
                .expect("at the limit")
                .len(),
            2 << 20
        );
    }
}
