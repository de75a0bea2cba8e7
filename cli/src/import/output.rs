//! Writing a generated policy: a file that is either the whole new policy or left as it was,
//! owner-only from creation on when it holds secrets.

use std::io::Write;
use std::path::Path;

/// Writes a policy atomically: a temporary file next to `path`, then a rename, so a reader (or
/// Envoy watching the directory) never sees half a policy and a failed write leaves the old
/// file untouched. Owner-only permissions, from creation on, when it holds secrets in clear.
pub fn write_policy(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let mut file = create_new(&tmp, secret)?;
    let result = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        // Ours: created above.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn create_new(path: &Path, secret: bool) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o666 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    options.open(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gateguard-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = temp_dir("replace");
        let path = dir.join("policy.json");
        std::fs::write(&path, "old").unwrap();
        write_policy(&path, "new\n", false).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["policy.json"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_policy_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("secret");
        let path = dir.join("policy.json");
        write_policy(&path, "{}", true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = temp_dir("fail");
        let path = dir.join("policy.json");
        std::fs::write(&path, "old").unwrap();
        // The temporary's name is taken by a directory: creating it fails.
        let tmp = dir.join(format!(".policy.json.{}.tmp", std::process::id()));
        std::fs::create_dir(&tmp).unwrap();
        assert!(write_policy(&path, "new", false).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
