//! The cluster secret: given in the settings or a file, or made once on first start and kept
//! in the data directory (as RabbitMQ makes its Erlang cookie), so that a node alone is a
//! cluster of one that no stranger can join.

use crate::config::Config;
use std::io::{self, Write};
use std::path::Path;

/// Where a generated secret is kept, in the data directory.
pub const GENERATED: &str = ".cluster-secret";

/// The secret's bytes: the `cluster_secret` setting, else the `cluster_secret_file`, else the
/// generated one (made now if there is none). An empty secret is refused: it would let any
/// node in.
pub fn load(config: &Config) -> io::Result<Vec<u8>> {
    let secret = if let Some(s) = &config.cluster_secret {
        s.trim().as_bytes().to_vec()
    } else if let Some(path) = &config.cluster_secret_file {
        read(path)?
    } else {
        generated(&config.data_dir)?
    };
    if secret.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the cluster secret is empty",
        ));
    }
    Ok(secret)
}

fn read(path: &Path) -> io::Result<Vec<u8>> {
    let text = std::fs::read(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot read the cluster secret file {}: {e}",
                path.display()
            ),
        )
    })?;
    Ok(text.trim_ascii().to_vec())
}

fn generated(data_dir: &Path) -> io::Result<Vec<u8>> {
    let path = data_dir.join(GENERATED);
    match std::fs::read(&path) {
        Ok(bytes) if !bytes.trim_ascii().is_empty() => return Ok(bytes.trim_ascii().to_vec()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let mut raw = [0u8; 32];
    rand::fill(&mut raw);
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    tracing::info!(
        path = %path.display(),
        "no cluster secret configured: generated one; other nodes join this one only with the same secret"
    );
    Ok(secret.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_secret_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        let first = load(&config).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(load(&config).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(config.data_dir.join(GENERATED))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "readable by others: {mode:o}");
        }
    }

    #[test]
    fn the_setting_wins_over_the_file_and_empty_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "  from-file\n").unwrap();
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            cluster_secret_file: Some(file.clone()),
            ..Config::default()
        };
        assert_eq!(load(&config).unwrap(), b"from-file");
        config.cluster_secret = Some("from-env".into());
        assert_eq!(load(&config).unwrap(), b"from-env");
        config.cluster_secret = Some("   ".into());
        assert!(load(&config).is_err());
        config.cluster_secret = None;
        config.cluster_secret_file = Some(dir.path().join("missing"));
        let err = load(&config).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
