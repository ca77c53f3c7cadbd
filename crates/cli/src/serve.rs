//! `scaletrain serve`: the planner page on a local HTTP server (crates/serve), answering its API
//! with the same functions the `estimate`, `plan`, `presets` and `validate` commands print with
//! `--json`. An API call's inputs are turned back into command-line flags and parsed by the
//! commands' own clap definitions, so a bad input gets the very error the command line gives.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::{ArgAction, Args, Parser};
use serve::{ApiError, Inputs};

use crate::spec::SpecArgs;
use crate::PlanArgs;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TCP port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on. The default answers this machine only; another address exposes
    /// the page to the network (it has no authentication).
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: String,
    /// Open the page in the default browser (xdg-open / open).
    #[arg(long)]
    pub open: bool,
}

/// `estimate`'s flags as the API accepts them.
#[derive(Debug, Parser)]
#[command(name = "scaletrain estimate", disable_help_flag = true)]
struct EstimateReq {
    #[command(flatten)]
    spec: SpecArgs,
    /// Include every formula (`--explain`).
    #[arg(long)]
    explain: bool,
}

/// `plan`'s flags as the API accepts them.
#[derive(Debug, Parser)]
#[command(name = "scaletrain plan", disable_help_flag = true)]
struct PlanReq {
    #[command(flatten)]
    plan: PlanArgs,
}

/// Inputs the API refuses: files on the server's disk (a pasted config is `hf-config-json`),
/// output switches, and the search's thread count (the server decides).
const REFUSED: &[&str] = &["config", "hf-config", "gpu-file", "json", "threads"];

/// The pasted Hugging Face `config.json` text (the page's textarea); written to a private
/// temporary file and given to the command as `--hf-config`.
const HF_TEXT: &str = "hf-config-json";

fn bad(message: impl Into<String>, field: Option<&str>) -> ApiError {
    ApiError {
        status: 400,
        message: message.into(),
        field: field.map(str::to_string),
    }
}

/// A temporary `config.json`, removed on drop.
#[derive(Debug)]
struct TempConfig(PathBuf);

impl TempConfig {
    fn write(text: &str) -> Result<Self, ApiError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "scaletrain-serve-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<PathBuf> {
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("config.json");
            std::fs::write(&path, text)?;
            Ok(path)
        };
        match write() {
            Ok(path) => Ok(Self(path)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(ApiError {
                    status: 500,
                    message: format!("cannot write a temporary config.json: {e}"),
                    field: Some(HF_TEXT.into()),
                })
            }
        }
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The input a message is about, if it is one of the inputs given: the first `--flag` it names,
/// else the earliest `name(` (layout arithmetic, `tp(3)`) or `invalid name:` (model checks),
/// else the input whose value the message quotes (`unknown model preset 'llama9'`).
fn field_of(message: &str, inputs: &Inputs) -> Option<String> {
    let given = |name: &str| inputs.iter().any(|(k, _)| k == name);
    let flag = message.match_indices("--").find_map(|(i, _)| {
        let name: String = message[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let name = if name == "hf-config" {
            HF_TEXT.to_string()
        } else {
            name
        };
        given(&name).then_some(name)
    });
    flag.or_else(|| {
        inputs
            .iter()
            .filter_map(|(k, _)| {
                let snake = k.replace('-', "_");
                [
                    format!("{k}("),
                    format!("invalid {k}:"),
                    format!("invalid {snake}:"),
                ]
                .iter()
                .filter_map(|p| message.find(p.as_str()))
                .min()
                .map(|pos| (pos, k.clone()))
            })
            .min()
            .map(|(_, k)| k)
    })
    .or_else(|| {
        inputs
            .iter()
            .find(|(_, v)| !v.is_empty() && message.contains(&format!("'{v}'")))
            .map(|(k, _)| k.clone())
    })
}

/// Parses the inputs as the command's flags. Keeps the temporary config alive while in use.
fn parse<P: Parser>(inputs: &Inputs) -> Result<(P, Option<TempConfig>), ApiError> {
    let cmd = P::command();
    let mut argv = vec![cmd.get_name().to_string()];
    let mut temp = None;
    for (k, v) in inputs {
        if REFUSED.contains(&k.as_str()) {
            return Err(bad(
                format!("--{k} is not accepted by the page's API (it names a file on the server or an output switch); paste a config.json as \"{HF_TEXT}\" instead of --hf-config"),
                Some(k),
            ));
        }
        if k == HF_TEXT {
            if !v.trim().is_empty() {
                let t = TempConfig::write(v)?;
                argv.push(format!("--hf-config={}", t.0.display()));
                temp = Some(t);
            }
            continue;
        }
        let flag = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(k.as_str()));
        let is_switch = flag.is_some_and(|a| matches!(a.get_action(), ArgAction::SetTrue));
        if is_switch {
            match v.as_str() {
                "true" | "on" | "1" | "" => argv.push(format!("--{k}")),
                "false" | "off" | "0" => {}
                _ => {
                    return Err(bad(
                        format!("--{k} is a switch: give true or false, not '{v}'"),
                        Some(k),
                    ))
                }
            }
        } else if !v.is_empty() {
            // `--k=v`: a value that starts with `-` stays a value and gets the flag's own error.
            argv.push(format!("--{k}={v}"));
        }
    }
    let parsed = P::try_parse_from(&argv).map_err(|e| {
        let text = e.render().to_string();
        let msg: Vec<&str> = text
            .lines()
            .filter(|l| {
                !l.trim().is_empty()
                    && !l.starts_with("Usage:")
                    && !l.starts_with("For more information")
            })
            .collect();
        let msg = msg.join(" ").trim_start_matches("error: ").to_string();
        let field = field_of(&msg, inputs);
        bad(msg, field.as_deref())
    })?;
    Ok((parsed, temp))
}

/// Turns a command's error into the API's, with the temporary path shown as `config.json`.
fn command_error(e: anyhow::Error, inputs: &Inputs, temp: &Option<TempConfig>) -> ApiError {
    let mut msg = format!("{e:#}");
    if let Some(t) = temp {
        msg = msg.replace(&t.0.display().to_string(), "config.json");
    }
    let field = field_of(&msg, inputs);
    bad(msg, field.as_deref())
}

fn json_text(v: &impl serde::Serialize) -> Result<String, ApiError> {
    serde_json::to_string(v).map_err(|e| ApiError {
        status: 500,
        message: format!("cannot serialise the answer: {e}"),
        field: None,
    })
}

/// The API backed by the commands' own functions.
struct CliApi;

impl serve::Api for CliApi {
    fn estimate(&self, inputs: &Inputs) -> Result<String, ApiError> {
        let (req, temp) = parse::<EstimateReq>(inputs)?;
        let ans = crate::estimate_answer(&req.spec, req.explain)
            .map_err(|e| command_error(e, inputs, &temp))?;
        json_text(&ans.est)
    }

    fn plan(&self, inputs: &Inputs) -> Result<String, ApiError> {
        let (req, temp) = parse::<PlanReq>(inputs)?;
        let ans = crate::plan_answer(&req.plan, &req.plan.spec)
            .map_err(|e| command_error(e, inputs, &temp))?;
        json_text(&crate::plan_json(&ans))
    }

    fn presets(&self) -> Result<String, ApiError> {
        let v = crate::presets_json().map_err(|e| command_error(e, &Vec::new(), &None))?;
        json_text(&v)
    }

    fn validate(&self) -> Result<String, ApiError> {
        json_text(&plan::validation::all_tables(&plan::Calibration::default()))
    }
}

pub fn run(a: &ServeArgs) -> Result<()> {
    let addr = if a.bind.contains(':') {
        format!("[{}]:{}", a.bind.trim_matches(['[', ']']), a.port) // IPv6
    } else {
        format!("{}:{}", a.bind, a.port)
    };
    let server = serve::Server::bind(&addr)?;
    let local = server.local_addr()?;
    let url = if local.ip().is_loopback() {
        format!("http://localhost:{}/", local.port())
    } else {
        format!("http://{local}/")
    };
    println!("scaletrain serve: the planner page is at {url} (Ctrl-C stops it)");
    if !local.ip().is_loopback() {
        println!(
            "warning: listening on {local}, reachable from the network, without authentication"
        );
    }
    use std::io::Write as _;
    std::io::stdout().flush().context("writing to stdout")?;
    if a.open {
        let opener = if cfg!(target_os = "macos") {
            "open"
        } else {
            "xdg-open"
        };
        if let Err(e) = std::process::Command::new(opener).arg(&url).spawn() {
            eprintln!("warning: could not start {opener} to open {url}: {e}; open it by hand");
        }
    }
    let api = Arc::new(CliApi);
    server.run(Arc::new(move |req| serve::route(req, &*api)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(kv: &[(&str, &str)]) -> Inputs {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn inputs_parse_as_the_commands_flags() {
        let (r, _) = parse::<EstimateReq>(&inputs(&[
            ("model", "llama3-8b"),
            ("gpus", "16"),
            ("sequence-parallel", "true"),
            ("no-overlap", "false"),
            ("explain", ""),
            ("tp", ""),
        ]))
        .unwrap();
        assert_eq!(r.spec.model.as_deref(), Some("llama3-8b"));
        assert_eq!((r.spec.gpus, r.spec.tp), (Some(16), None));
        assert!(r.spec.sequence_parallel && !r.spec.no_overlap && r.explain);
    }

    #[test]
    fn bad_inputs_get_the_flag_error_and_name_the_field() {
        let e = parse::<EstimateReq>(&inputs(&[("gpus", "-4")])).unwrap_err();
        assert!(e.message.contains("--gpus"), "{e:?}");
        assert_eq!(e.field.as_deref(), Some("gpus"));
        let e = parse::<EstimateReq>(&inputs(&[("modle", "x")])).unwrap_err();
        assert!(
            e.message.contains("--model"),
            "suggests the real flag: {e:?}"
        );
        let e = parse::<PlanReq>(&inputs(&[("gpu-file", "/etc/passwd")])).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("gpu-file"));
        let layout = inputs(&[("gpus", "8"), ("tp", "3")]);
        let msg = "invalid layout: cannot infer dp: 8 GPUs is not divisible by tp(3) * pp(1) = 3";
        assert_eq!(field_of(msg, &layout).as_deref(), Some("tp"));
        let shape = inputs(&[("hidden", "3"), ("heads", "7"), ("seq-len", "0")]);
        let msg = "invalid heads: hidden (3) is not divisible by heads (7)";
        assert_eq!(field_of(msg, &shape).as_deref(), Some("heads"));
        let msg = "invalid seq_len: 0 must be positive";
        assert_eq!(field_of(msg, &shape).as_deref(), Some("seq-len"));
        let e = parse::<EstimateReq>(&inputs(&[("sequence-parallel", "maybe")])).unwrap_err();
        assert!(e.message.contains("true or false"), "{e:?}");
    }
}
