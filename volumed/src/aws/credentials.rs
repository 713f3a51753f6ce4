//! The keys that may sign requests, from a file in the AWS credentials-file
//! format (`~/.aws/credentials`): INI sections, one per profile, each with
//! `aws_access_key_id` and `aws_secret_access_key`. Other keys
//! (`aws_session_token`, `region`) are allowed and ignored.
//!
//! Whoever reads the file can sign as anyone in it, so it is refused unless
//! only its owner can read or write it, as ssh does with private keys.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "credentials file {path} is readable or writable by group or others (mode {mode:o}); chmod 600 it"
    )]
    Permissions { path: String, mode: u32 },
    #[error("credentials file line {line}: {reason}")]
    Syntax { line: usize, reason: &'static str },
    #[error("credentials file profile [{profile}] lacks {missing}")]
    Incomplete {
        profile: String,
        missing: &'static str,
    },
    #[error("credentials file names access key {0} in two profiles")]
    Duplicate(String),
    #[error("credentials file has no profile with a key")]
    Empty,
}

/// One signing key.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub profile: String,
    pub access_key_id: String,
    pub secret: String,
}

impl std::fmt::Debug for Credential {
    // The secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("profile", &self.profile)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// The keys by access key id.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_id: HashMap<String, Credential>,
}

impl Credentials {
    /// Reads `path`, refusing a file others may read or write.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let err = |source| CredentialsError::Read {
            path: path.display().to_string(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(err)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(CredentialsError::Permissions {
                path: path.display().to_string(),
                mode: mode & 0o777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(err)?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, CredentialsError> {
        let mut by_id = HashMap::new();
        // (profile, id, secret) of the section being read.
        let mut current: Option<(String, Option<String>, Option<String>)> = None;
        let finish = |c: Option<(String, Option<String>, Option<String>)>,
                      by_id: &mut HashMap<String, Credential>|
         -> Result<(), CredentialsError> {
            let Some((profile, id, secret)) = c else {
                return Ok(());
            };
            let (id, secret) = match (id, secret) {
                (None, None) => return Ok(()),
                (None, Some(_)) => {
                    return Err(CredentialsError::Incomplete {
                        profile,
                        missing: "aws_access_key_id",
                    });
                }
                (Some(_), None) => {
                    return Err(CredentialsError::Incomplete {
                        profile,
                        missing: "aws_secret_access_key",
                    });
                }
                (Some(i), Some(s)) => (i, s),
            };
            if by_id.contains_key(&id) {
                return Err(CredentialsError::Duplicate(id));
            }
            by_id.insert(
                id.clone(),
                Credential {
                    profile,
                    access_key_id: id,
                    secret,
                },
            );
            Ok(())
        };
        for (n, raw) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(rest) = line.strip_prefix('[') {
                let name = rest.strip_suffix(']').ok_or(CredentialsError::Syntax {
                    line: line_no,
                    reason: "section header without ]",
                })?;
                let name = name.trim();
                let name = name.strip_prefix("profile ").unwrap_or(name).trim();
                if name.is_empty() {
                    return Err(CredentialsError::Syntax {
                        line: line_no,
                        reason: "empty profile name",
                    });
                }
                finish(current.take(), &mut by_id)?;
                current = Some((name.to_owned(), None, None));
                continue;
            }
            let (k, v) = line.split_once('=').ok_or(CredentialsError::Syntax {
                line: line_no,
                reason: "expected key = value",
            })?;
            let Some(section) = current.as_mut() else {
                return Err(CredentialsError::Syntax {
                    line: line_no,
                    reason: "key before any [profile]",
                });
            };
            let v = v.trim();
            match k.trim() {
                "aws_access_key_id" | "aws_secret_access_key" if v.is_empty() => {
                    return Err(CredentialsError::Syntax {
                        line: line_no,
                        reason: "empty key value",
                    });
                }
                "aws_access_key_id" => section.1 = Some(v.to_owned()),
                "aws_secret_access_key" => section.2 = Some(v.to_owned()),
                _ => {}
            }
        }
        finish(current.take(), &mut by_id)?;
        if by_id.is_empty() {
            return Err(CredentialsError::Empty);
        }
        Ok(Credentials { by_id })
    }

    pub fn get(&self, access_key_id: &str) -> Option<&Credential> {
        self.by_id.get(access_key_id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse() {
        let c = Credentials::parse(
            "# keys\n[default]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key=secret1\nregion = us-east-1\n\n[profile ci]\n; other\naws_access_key_id=AKID2\naws_secret_access_key = s2 \naws_session_token = tok\n[empty]\n",
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("AKIDEXAMPLE").unwrap().secret, "secret1");
        let ci = c.get("AKID2").unwrap();
        assert_eq!((ci.profile.as_str(), ci.secret.as_str()), ("ci", "s2"));
        assert!(!format!("{ci:?}").contains("s2"), "no secret in Debug");
    }

    #[test]
    fn bad_files_are_refused() {
        for bad in [
            "",
            "aws_access_key_id = x\n",
            "[a\naws_access_key_id = x\n",
            "[a]\naws_access_key_id = x\n",
            "[a]\naws_secret_access_key = x\n",
            "[a]\nnonsense\n",
            "[a]\naws_access_key_id =\naws_secret_access_key = s\n",
            "[a]\naws_access_key_id = k\naws_secret_access_key = s\n[b]\naws_access_key_id = k\naws_secret_access_key = t\n",
            "[]\n",
        ] {
            assert!(Credentials::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn open_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("credentials");
        std::fs::write(&p, "[d]\naws_access_key_id=k\naws_secret_access_key=s\n").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o644, false),
            (0o640, false),
            (0o602, false),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(Credentials::load(&p).is_ok(), ok, "{mode:o}");
        }
    }
}
