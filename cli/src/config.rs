//! Where the CLI connects and with which key.
//!
//! Sources, later ones winning: built-in defaults, the TOML file
//! (`$XDG_CONFIG_HOME/ferro/config.toml`, else `~/.config/ferro/config.toml`,
//! or `--config FILE`), the environment (`FERRO_ENDPOINT`, `FERRO_API_KEY`,
//! `FERRO_CA_FILE`) and the `--endpoint` flag. The file knows `endpoint`
//! (one URL, or the nodes of an HA cluster separated by commas), `api_key`
//! and `ca_file` (the CA of `https://` controllers; the system's roots
//! when absent); unknown keys are errors. A missing default file is not an
//! error.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The endpoint used when nothing else names one.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7400";

/// Environment variable overriding `endpoint`.
pub const ENV_ENDPOINT: &str = "FERRO_ENDPOINT";
/// Environment variable overriding `api_key`.
pub const ENV_API_KEY: &str = "FERRO_API_KEY";
/// Environment variable overriding `ca_file`.
pub const ENV_CA_FILE: &str = "FERRO_CA_FILE";

/// A configuration that cannot be used. Each message names the file (or
/// variable) and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("{}: cannot read the file", path.display())]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{}: {field}: {message}", path.display())]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The offending key, or `(file)` when none can be named.
        field: String,
        /// What is wrong, from the TOML parser.
        message: String,
    },
    /// A field has a value that cannot be used.
    #[error("{source_name}: {field}: {message}")]
    Invalid {
        /// The file or environment variable the value came from.
        source_name: String,
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No home directory to find the default file in.
    #[error("cannot find the configuration file: neither XDG_CONFIG_HOME nor HOME is set")]
    NoHome,
}

/// The file's contents. Both keys are optional.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The controller's gRPC endpoint, `http://host:port`.
    pub endpoint: Option<String>,
    /// The API key sent as a bearer token.
    pub api_key: Option<String>,
    /// The CA (PEM file) of `https://` controllers.
    pub ca_file: Option<PathBuf>,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The first controller endpoint, normalised to `http(s)://host:port`.
    pub endpoint: String,
    /// Every configured controller endpoint (the setting may list the
    /// nodes of an HA cluster separated by commas), `endpoint` first.
    pub endpoints: Vec<String>,
    /// API key, if any.
    pub api_key: Option<String>,
    /// The CA (PEM file) to verify `https://` controllers with; the
    /// system's roots when `None`.
    pub ca_file: Option<PathBuf>,
    /// No endpoint was configured anywhere: `endpoint` is the default.
    pub endpoint_is_default: bool,
}

/// The default configuration file for this user.
pub fn default_path() -> Result<PathBuf, ConfigError> {
    default_path_from(
        std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

fn default_path_from(xdg: Option<PathBuf>, home: Option<PathBuf>) -> Result<PathBuf, ConfigError> {
    let base = match (xdg.filter(|p| p.is_absolute()), home) {
        (Some(x), _) => x,
        (None, Some(h)) => h.join(".config"),
        (None, None) => return Err(ConfigError::NoHome),
    };
    Ok(base.join("ferro").join("config.toml"))
}

/// Parses the file's text; `path` is only used in messages.
pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        field: field_of(text, &e),
        message: e.message().to_string(),
    })
}

/// The key a TOML error is about: the unknown field it names, else the key
/// on the line of the error span, else `(file)`.
fn field_of(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some(end) = rest.find('`') {
            return rest[..end].to_string();
        }
    }
    e.span()
        .and_then(|span| {
            let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
            let line = &text[start..];
            let line = line.split('\n').next().unwrap_or("");
            line.split_once('=').map(|(k, _)| k.trim().to_string())
        })
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| "(file)".to_string())
}

/// Reads the file; a missing file gives the empty configuration when
/// `must_exist` is false.
pub fn read_file(path: &Path, must_exist: bool) -> Result<FileConfig, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_file(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
            Ok(FileConfig::default())
        }
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Inputs to [`resolve`], kept apart from the process environment so they
/// can be tested.
#[derive(Debug, Default)]
pub struct Sources {
    /// The file's contents and its path.
    pub file: Option<(PathBuf, FileConfig)>,
    /// `FERRO_ENDPOINT`.
    pub env_endpoint: Option<String>,
    /// `FERRO_API_KEY`.
    pub env_api_key: Option<String>,
    /// `FERRO_CA_FILE`.
    pub env_ca_file: Option<String>,
    /// `--endpoint`.
    pub flag_endpoint: Option<String>,
    /// `--api-key`.
    pub flag_api_key: Option<String>,
}

impl Sources {
    /// Gathers the sources from the file (`--config` or the default) and
    /// the process environment.
    pub fn gather(
        config_flag: Option<&Path>,
        flag_endpoint: Option<String>,
        flag_api_key: Option<String>,
    ) -> Result<Self, ConfigError> {
        let (path, must_exist) = match config_flag {
            Some(p) => (p.to_path_buf(), true),
            None => (default_path()?, false),
        };
        let file = read_file(&path, must_exist)?;
        let env = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        Ok(Self {
            file: Some((path, file)),
            env_endpoint: env(ENV_ENDPOINT),
            env_api_key: env(ENV_API_KEY),
            env_ca_file: env(ENV_CA_FILE),
            flag_endpoint,
            flag_api_key,
        })
    }
}

/// Merges the sources (flag > environment > file > default) and checks
/// the values.
pub fn resolve(src: Sources) -> Result<Config, ConfigError> {
    let file_name = src
        .file
        .as_ref()
        .map_or_else(String::new, |(p, _)| p.display().to_string());
    let (file_endpoint, file_key, file_ca) = src
        .file
        .map(|(_, f)| (f.endpoint, f.api_key, f.ca_file))
        .unwrap_or_default();
    let ca_file = src.env_ca_file.map(PathBuf::from).or(file_ca);
    let (endpoint, endpoint_src) = if let Some(e) = src.flag_endpoint {
        (e, "--endpoint".to_string())
    } else if let Some(e) = src.env_endpoint {
        (e, ENV_ENDPOINT.to_string())
    } else if let Some(e) = file_endpoint {
        (e, file_name.clone())
    } else {
        (DEFAULT_ENDPOINT.to_string(), "default".to_string())
    };
    let endpoint_is_default = endpoint_src == "default";
    let endpoints = endpoint
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(normalize_endpoint)
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() {
                Err("names no endpoint".to_string())
            } else {
                Ok(v)
            }
        })
        .map_err(|message| ConfigError::Invalid {
            source_name: endpoint_src,
            field: "endpoint",
            message,
        })?;
    let endpoint = endpoints[0].clone();
    let (api_key, key_src) = match (src.flag_api_key, src.env_api_key, file_key) {
        (Some(k), _, _) => (Some(k), "--api-key".to_string()),
        (None, Some(k), _) => (Some(k), ENV_API_KEY.to_string()),
        (None, None, k) => (k, file_name),
    };
    if let Some(k) = &api_key {
        check_api_key(k).map_err(|message| ConfigError::Invalid {
            source_name: key_src,
            field: "api_key",
            message,
        })?;
    }
    Ok(Config {
        endpoint,
        endpoints,
        api_key,
        ca_file,
        endpoint_is_default,
    })
}

pub use ferro_client::normalize_endpoint;

fn check_api_key(k: &str) -> Result<(), String> {
    if k.is_empty() {
        return Err("is empty".into());
    }
    if !k.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<FileConfig, ConfigError> {
        parse_file(Path::new("/home/u/.config/ferro/config.toml"), text)
    }

    fn with_file(f: FileConfig) -> Sources {
        Sources {
            file: Some((PathBuf::from("/c.toml"), f)),
            ..Sources::default()
        }
    }

    #[test]
    fn parses_both_keys() {
        let f = file("endpoint = \"http://10.0.0.1:7400\"\napi_key = \"fk_abc\"\n").unwrap();
        assert_eq!(f.endpoint.as_deref(), Some("http://10.0.0.1:7400"));
        assert_eq!(f.api_key.as_deref(), Some("fk_abc"));
        assert_eq!(file("").unwrap(), FileConfig::default());
    }

    #[test]
    fn unknown_key_names_file_and_field() {
        let e = file("endpoint = \"http://a:1\"\napikey = \"x\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("/home/u/.config/ferro/config.toml: apikey: "),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = file("endpoint = 7400\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("/home/u/.config/ferro/config.toml: endpoint: "),
            "{msg}"
        );
    }

    #[test]
    fn bad_endpoint_in_file_names_file_and_field() {
        let src = with_file(FileConfig {
            endpoint: Some("ftp://x:1".into()),
            api_key: None,
            ca_file: None,
        });
        let msg = resolve(src).unwrap_err().to_string();
        assert_eq!(
            msg,
            "/c.toml: endpoint: unsupported scheme `ftp` (use http or https)"
        );
    }

    #[test]
    fn environment_wins_over_file() {
        let mut src = with_file(FileConfig {
            endpoint: Some("http://file:1".into()),
            api_key: Some("filekey".into()),
            ca_file: Some("/file-ca.pem".into()),
        });
        src.env_endpoint = Some("env:2".into());
        src.env_api_key = Some("envkey".into());
        let c = resolve(src).unwrap();
        assert_eq!(c.endpoint, "http://env:2");
        assert_eq!(c.api_key.as_deref(), Some("envkey"));
        assert_eq!(c.ca_file.as_deref(), Some(Path::new("/file-ca.pem")));
    }

    #[test]
    fn flag_wins_over_environment() {
        let src = Sources {
            env_endpoint: Some("env:2".into()),
            flag_endpoint: Some("https://flag:3/".into()),
            ..Sources::default()
        };
        assert_eq!(resolve(src).unwrap().endpoint, "https://flag:3");
    }

    #[test]
    fn defaults_without_sources() {
        let c = resolve(Sources::default()).unwrap();
        assert_eq!(c.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(c.api_key, None);
    }

    #[test]
    fn bad_key_from_environment_names_the_variable() {
        let src = Sources {
            env_api_key: Some("has space".into()),
            ..Sources::default()
        };
        let msg = resolve(src).unwrap_err().to_string();
        assert!(msg.starts_with("FERRO_API_KEY: api_key: "), "{msg}");
    }

    #[test]
    fn several_endpoints_for_an_ha_cluster() {
        let src = Sources {
            env_endpoint: Some("c1:7400, http://c2:7400/,c3:7400".into()),
            ..Default::default()
        };
        let c = resolve(src).unwrap();
        assert_eq!(c.endpoint, "http://c1:7400");
        assert_eq!(
            c.endpoints,
            vec!["http://c1:7400", "http://c2:7400", "http://c3:7400"]
        );
        let src = Sources {
            env_endpoint: Some("c1:7400,ftp://x:1".into()),
            ..Default::default()
        };
        let e = resolve(src).unwrap_err().to_string();
        assert!(e.contains("endpoint") && e.contains("ftp"), "{e}");
        let src = Sources {
            env_endpoint: Some(" , ".into()),
            ..Default::default()
        };
        assert!(resolve(src).is_err());
    }

    #[test]
    fn endpoint_needs_a_port() {
        assert!(normalize_endpoint("http://host").is_err());
        assert!(normalize_endpoint("host:0").is_err());
        assert!(normalize_endpoint("http://h:1/path").is_err());
        assert_eq!(
            normalize_endpoint("[::1]:7400").unwrap(),
            "http://[::1]:7400"
        );
    }

    #[test]
    fn default_path_prefers_xdg() {
        let p = default_path_from(Some("/x".into()), Some("/h".into())).unwrap();
        assert_eq!(p, PathBuf::from("/x/ferro/config.toml"));
        let p = default_path_from(Some("rel".into()), Some("/h".into())).unwrap();
        assert_eq!(p, PathBuf::from("/h/.config/ferro/config.toml"));
        assert!(default_path_from(None, None).is_err());
    }

    #[test]
    fn missing_default_file_is_empty_but_missing_flag_file_is_an_error() {
        let p = Path::new("/nonexistent/ferro/config.toml");
        assert_eq!(read_file(p, false).unwrap(), FileConfig::default());
        let msg = read_file(p, true).unwrap_err().to_string();
        assert_eq!(msg, "/nonexistent/ferro/config.toml: cannot read the file");
    }
}
