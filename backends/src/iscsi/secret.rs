//! Where CHAP secrets come from: the layout itself, a file it names, or an environment
//! variable. Read when a member opens (so a rotated file is picked up on the next
//! open); never logged: `Debug` shows where a secret lives, not what it is.

use std::path::PathBuf;

use super::login::Chap;
use super::IscsiError;

/// A secret, or where to find it.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    Inline(String),
    /// A file holding the secret (one trailing newline is dropped).
    File(PathBuf),
    /// An environment variable of the daemon.
    Env(String),
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Inline(_) => write!(f, "Inline(***)"),
            SecretSource::File(p) => write!(f, "File({})", p.display()),
            SecretSource::Env(v) => write!(f, "Env({v})"),
        }
    }
}

/// The longest secret accepted from a file (RFC 7143 §12.1.3 keeps them far shorter).
const MAX_SECRET: u64 = 4096;

impl SecretSource {
    pub fn resolve(&self) -> Result<String, IscsiError> {
        let s = match self {
            SecretSource::Inline(s) => s.clone(),
            SecretSource::File(p) => read_file(p)?,
            SecretSource::Env(v) => std::env::var(v).map_err(|_| {
                IscsiError::Secret(format!(
                    "the environment variable {v} is not set (or not UTF-8); set it in ublkd's environment"
                ))
            })?,
        };
        if s.is_empty() {
            return Err(IscsiError::Secret(format!(
                "the secret from {self:?} is empty"
            )));
        }
        Ok(s)
    }
}

fn read_file(p: &std::path::Path) -> Result<String, IscsiError> {
    let fail = |why: String| IscsiError::Secret(format!("{}: {why}", p.display()));
    let meta =
        std::fs::metadata(p).map_err(|e| fail(format!("{e}; create it or fix the layout")))?;
    if meta.len() > MAX_SECRET {
        return Err(fail(format!(
            "{} bytes is too long for a CHAP secret",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(p).map_err(|e| fail(e.to_string()))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(text.strip_suffix('\r').unwrap_or(text).to_string())
}

/// A CHAP user and where its secret is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapSource {
    pub user: String,
    pub secret: SecretSource,
}

impl ChapSource {
    pub fn resolve(&self) -> Result<Chap, IscsiError> {
        Ok(Chap {
            user: self.user.clone(),
            secret: self.secret.resolve()?,
        })
    }
}

/// CHAP settings of the layout's `remote.iscsi` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IscsiAuth {
    /// Our credentials; overrides `user%secret@` in the URL.
    pub chap: Option<ChapSource>,
    /// The target's credentials, for mutual CHAP.
    pub mutual: Option<ChapSource>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_resolve_and_hide_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "from-file-secret\n").unwrap();
        assert_eq!(
            SecretSource::File(f.clone()).resolve().unwrap(),
            "from-file-secret"
        );
        std::env::set_var("UNIBLK_TEST_CHAP_SECRET", "from-env-secret");
        let env = SecretSource::Env("UNIBLK_TEST_CHAP_SECRET".into());
        assert_eq!(env.resolve().unwrap(), "from-env-secret");
        let inline = SecretSource::Inline("inline-secret".into());
        assert_eq!(format!("{inline:?}"), "Inline(***)");
        let e = SecretSource::Env("UNIBLK_TEST_UNSET_VAR".into())
            .resolve()
            .unwrap_err();
        assert!(
            e.to_string().contains("UNIBLK_TEST_UNSET_VAR is not set"),
            "{e}"
        );
        let e = SecretSource::File(dir.path().join("none"))
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("create it"), "{e}");
    }
}
