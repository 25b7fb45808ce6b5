//! API keys: which callers every door (HTTP, WebSocket, both TCP ports) lets in.
//!
//! The keys come from a file (`--api-keys-file`), one per line; blank lines and `#`
//! comments are skipped and every key has at least 16 characters. Without the file every
//! door is open. The file is read again every `--api-keys-reload` (5 s), so that a key
//! rotated in a mounted Kubernetes Secret takes effect without a restart: the new set
//! replaces the old one whole. A file that cannot be read or holds no usable key keeps the
//! keys in force (the doors never open because a file went missing); each reload is
//! counted in `sluice_ingest_api_key_reloads_total{result}`.
//!
//! HTTP and WebSocket callers send a key as `Authorization: Bearer <key>` or
//! `X-Api-Key: <key>`; TCP clients send the line `auth <key>` first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Shortest key accepted.
pub const MIN_KEY_LEN: usize = 16;

/// The keys in force, or none when the doors are open.
pub struct ApiKeys {
    file: Option<PathBuf>,
    keys: RwLock<Arc<[Vec<u8>]>>,
}

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("API key file {path}: {reason}")]
pub struct KeyFileError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

/// Reads a key file: one key per line; blank lines and `#` comments are skipped.
pub fn read_keys(path: &Path) -> Result<Vec<Vec<u8>>, KeyFileError> {
    let error = |reason: String| KeyFileError {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let keys: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect();
    if keys.is_empty() {
        return Err(error("holds no key".to_owned()));
    }
    if let Some(short) = keys.iter().find(|k| k.len() < MIN_KEY_LEN) {
        return Err(error(format!(
            "a key of {} characters is too short to be safe; use at least {MIN_KEY_LEN}",
            short.len()
        )));
    }
    Ok(keys)
}

impl ApiKeys {
    /// Every door open.
    pub fn open() -> Self {
        Self {
            file: None,
            keys: RwLock::new(Arc::from(Vec::new())),
        }
    }

    /// The keys of `file`, or open doors without one.
    pub fn load(file: Option<&Path>) -> Result<Self, KeyFileError> {
        let Some(file) = file else {
            return Ok(Self::open());
        };
        let keys = read_keys(file)?;
        Ok(Self {
            file: Some(file.to_owned()),
            keys: RwLock::new(Arc::from(keys)),
        })
    }

    /// Whether callers need a key.
    pub fn required(&self) -> bool {
        self.file.is_some()
    }

    /// Whether `given` may pass: always when no key is required.
    pub fn accepts(&self, given: &[u8]) -> bool {
        if !self.required() {
            return true;
        }
        let keys = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // Compared with every key without stopping early, in constant time per key.
        let mut valid = subtle::Choice::from(0);
        for key in keys.iter() {
            valid |= key.as_slice().ct_eq(given);
        }
        bool::from(valid)
    }

    /// Reads the file again; returns whether the keys changed.
    pub fn reload(&self) -> Result<bool, KeyFileError> {
        let Some(file) = &self.file else {
            return Ok(false);
        };
        let keys = read_keys(file)?;
        let mut current = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if *current.as_ref() == keys[..] {
            return Ok(false);
        }
        *current = Arc::from(keys);
        Ok(true)
    }

    /// Reloads the file every `every` until `shutdown`; a failure keeps the keys in force
    /// and is logged once until the file is usable again.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        if !self.required() {
            return;
        }
        let mut failing = false;
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload() {
                Ok(changed) => {
                    if changed {
                        tracing::info!("API keys reloaded");
                        metrics.api_key_reload("ok");
                    }
                    failing = false;
                }
                Err(e) => {
                    metrics.api_key_reload("error");
                    if !failing {
                        tracing::warn!(error = %e, "cannot reload the API keys; the keys in force stay");
                    }
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_file_replaces_the_keys_and_a_broken_one_keeps_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keys");
        std::fs::write(&file, "# team a\nfirst-key-0123456789\n\n").expect("write");
        let keys = ApiKeys::load(Some(&file)).expect("load");
        assert!(keys.required());
        assert!(keys.accepts(b"first-key-0123456789"));
        assert!(!keys.accepts(b"second-key-0123456789"));
        assert!(!keys.accepts(b""));

        std::fs::write(&file, "second-key-0123456789\n").expect("write");
        assert!(keys.reload().expect("reload"), "changed");
        assert!(!keys.reload().expect("reload"), "unchanged");
        assert!(keys.accepts(b"second-key-0123456789"));
        assert!(
            !keys.accepts(b"first-key-0123456789"),
            "the old key is gone"
        );

        for broken in ["", "# nothing\n", "short\n"] {
            std::fs::write(&file, broken).expect("write");
            assert!(keys.reload().is_err(), "{broken:?}");
            assert!(
                keys.accepts(b"second-key-0123456789"),
                "kept after {broken:?}"
            );
        }
        std::fs::remove_file(&file).expect("remove");
        assert!(keys.reload().is_err());
        assert!(
            keys.accepts(b"second-key-0123456789"),
            "kept without the file"
        );
    }

    #[test]
    fn without_a_file_every_caller_passes() {
        let keys = ApiKeys::load(None).expect("open");
        assert!(!keys.required());
        assert!(keys.accepts(b""));
    }

    #[test]
    fn a_file_without_a_usable_key_is_refused_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keys");
        std::fs::write(&file, "short\n").expect("write");
        let err = ApiKeys::load(Some(&file)).err().expect("too short");
        assert!(err.to_string().contains("at least 16"), "{err}");
        let err = ApiKeys::load(Some(&dir.path().join("absent")))
            .err()
            .expect("absent");
        assert!(err.to_string().contains("absent"), "{err}");
    }
}
