//! The image config document, as far as tarn reads it: the program a
//! container of the image runs ([`Entrypoint`]), which the layer hints
//! fetch early (`layer::program`).

/// `PATH` when the image config sets none (the one runc and docker use).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The program an image config runs: its `argv[0]`, `Env` and `WorkingDir`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entrypoint {
    pub argv0: String,
    pub path: String,
    pub workdir: String,
}

impl Entrypoint {
    /// From an OCI image config document; `None` if it names no program.
    pub fn from_config(config: &[u8]) -> Option<Entrypoint> {
        #[derive(serde::Deserialize, Default)]
        #[serde(rename_all = "PascalCase", default)]
        struct Run {
            entrypoint: Option<Vec<String>>,
            cmd: Option<Vec<String>>,
            env: Option<Vec<String>>,
            working_dir: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            config: Option<Run>,
        }
        let run = serde_json::from_slice::<Config>(config).ok()?.config?;
        let argv0 = run
            .entrypoint
            .filter(|e| !e.is_empty())
            .or(run.cmd)?
            .into_iter()
            .next()
            .filter(|a| !a.is_empty())?;
        let path = run
            .env
            .unwrap_or_default()
            .into_iter()
            .find_map(|e| e.strip_prefix("PATH=").map(str::to_owned))
            .unwrap_or_else(|| DEFAULT_PATH.to_owned());
        Some(Entrypoint {
            argv0,
            path,
            workdir: run.working_dir.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_names_the_program_entrypoint_first() {
        let e = Entrypoint::from_config(
            br#"{"config":{"Entrypoint":["/docker-entrypoint.sh"],"Cmd":["nginx"],
                "Env":["A=1","PATH=/opt/bin:/bin"],"WorkingDir":"/srv"}}"#,
        )
        .unwrap();
        assert_eq!(e.argv0, "/docker-entrypoint.sh");
        assert_eq!(e.path, "/opt/bin:/bin");
        assert_eq!(e.workdir, "/srv");
        let e = Entrypoint::from_config(br#"{"config":{"Cmd":["python3","-c","1"]}}"#).unwrap();
        assert_eq!(e.argv0, "python3");
        assert_eq!(e.path, DEFAULT_PATH);
        let e = Entrypoint::from_config(
            br#"{"config":{"Entrypoint":[],"Cmd":["./run"],"WorkingDir":"/app/"}}"#,
        )
        .unwrap();
        assert_eq!((e.argv0.as_str(), e.workdir.as_str()), ("./run", "/app/"));
        assert_eq!(Entrypoint::from_config(br#"{"config":{}}"#), None);
        assert_eq!(Entrypoint::from_config(br#"{"config":{"Cmd":[""]}}"#), None);
        assert_eq!(Entrypoint::from_config(b"not json"), None);
    }
}
