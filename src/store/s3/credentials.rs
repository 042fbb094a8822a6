//! Credentials from an AWS shared-credentials file (the INI format of
//! `~/.aws/credentials`), typically a Kubernetes Secret mounted as a file. The
//! file is re-read whenever it changes, so a rotated Secret is picked up
//! without a restart; a broken new file keeps the last good credentials.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use object_store::{CredentialProvider, aws::AwsCredential};

#[derive(Debug)]
pub(super) struct FileCredentials {
    path: PathBuf,
    profile: String,
    cached: Mutex<Option<(SystemTime, Arc<AwsCredential>)>>,
}

impl FileCredentials {
    pub(super) fn new(path: PathBuf, profile: String) -> Self {
        Self {
            path,
            profile,
            cached: Mutex::new(None),
        }
    }

    fn load(&self) -> Result<Arc<AwsCredential>, String> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(|e| format!("reading {}: {e}", self.path.display()))?;
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, cred)) = cached.as_ref()
            && *at == modified
        {
            return Ok(cred.clone());
        }
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("reading {}: {e}", self.path.display()));
        match text.and_then(|t| parse(&t, &self.profile)) {
            Ok(cred) => {
                let cred = Arc::new(cred);
                *cached = Some((modified, cred.clone()));
                Ok(cred)
            }
            Err(e) => match cached.as_ref() {
                Some((_, old)) => {
                    tracing::error!(file = %self.path.display(), error = %e, "credentials file unusable; keeping the previous credentials");
                    Ok(old.clone())
                }
                None => Err(format!("{}: {e}", self.path.display())),
            },
        }
    }
}

#[async_trait::async_trait]
impl CredentialProvider for FileCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        self.load().map_err(|e| object_store::Error::Generic {
            store: "S3",
            source: e.into(),
        })
    }
}

/// Reads `aws_access_key_id`, `aws_secret_access_key` and the optional
/// `aws_session_token` of `[profile]`. Errors name the problem, never a value.
fn parse(text: &str, profile: &str) -> Result<AwsCredential, String> {
    let mut in_profile = false;
    let mut found = false;
    let (mut key_id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let section = section.trim();
            in_profile = section == profile || section == format!("profile {profile}");
            found |= in_profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().to_owned();
        match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => key_id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    if !found {
        return Err(format!("no [{profile}] profile"));
    }
    match (key_id, secret) {
        (Some(key_id), Some(secret_key)) if !key_id.is_empty() && !secret_key.is_empty() => {
            Ok(AwsCredential {
                key_id,
                secret_key,
                token: token.filter(|t| !t.is_empty()),
            })
        }
        _ => Err(format!(
            "profile [{profile}] needs aws_access_key_id and aws_secret_access_key"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# comment\n[default]\naws_access_key_id = AKIDEFAULT\naws_secret_access_key=secret1\n\n[other]\nAWS_ACCESS_KEY_ID = AKIOTHER\naws_secret_access_key = secret2\naws_session_token = tok\n";

    #[test]
    fn reads_the_named_profile() {
        let c = parse(FILE, "default").unwrap();
        assert_eq!(
            (c.key_id.as_str(), c.secret_key.as_str()),
            ("AKIDEFAULT", "secret1")
        );
        assert_eq!(c.token, None);
        let c = parse(FILE, "other").unwrap();
        assert_eq!(c.key_id, "AKIOTHER");
        assert_eq!(c.token.as_deref(), Some("tok"));
    }

    #[test]
    fn missing_profile_or_keys_are_errors_that_show_no_secret() {
        let e = parse(FILE, "absent").unwrap_err();
        assert!(e.contains("no [absent] profile"), "{e}");
        let e = parse("[default]\naws_access_key_id = AKID\n", "default").unwrap_err();
        assert!(e.contains("aws_secret_access_key"), "{e}");
        assert!(!e.contains("AKID"), "{e}");
    }

    #[test]
    fn a_broken_rewrite_keeps_the_last_good_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        std::fs::write(&path, FILE).unwrap();
        let creds = FileCredentials::new(path.clone(), "default".into());
        assert_eq!(creds.load().unwrap().key_id, "AKIDEFAULT");
        // A rotation: new content, new mtime.
        std::fs::write(&path, FILE.replace("AKIDEFAULT", "AKIROTATED")).unwrap();
        bump_mtime(&path, 10);
        assert_eq!(creds.load().unwrap().key_id, "AKIROTATED");
        std::fs::write(&path, "[default]\n").unwrap();
        bump_mtime(&path, 20);
        assert_eq!(creds.load().unwrap().key_id, "AKIROTATED");
    }

    fn bump_mtime(path: &std::path::Path, secs: u64) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(secs))
            .unwrap();
    }
}
