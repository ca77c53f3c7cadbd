//! scaletrain-serve: the planner page. A small HTTP/1.1 server over `std` ([`server`], [`http`]),
//! the page itself (HTML, CSS and JavaScript embedded with `include_str!`, drawing its charts as
//! SVG, fetching nothing from the network), and the routing of its JSON API ([`route`]).
//!
//! The crate does not compute estimates: the binary hands it an [`Api`] whose methods are the
//! very functions behind `scaletrain estimate --json`, `plan --json`, `presets --json` and
//! `validate --json`, so the page and the command line cannot disagree. See
//! `docs/planner-page.md`.

pub mod client;
pub mod error;
pub mod http;
pub mod load;
pub mod server;

pub use error::{HttpError, ServeError};
pub use http::{Request, Response};
pub use server::Server;

/// The inputs of one API call: `(flag name without dashes, value)` pairs, as given in the
/// query string (`?model=llama3-8b&gpus=16`) or a JSON object body (`{"model": "llama3-8b",
/// "gpus": 16}`). A boolean flag is `true` / `false`.
pub type Inputs = Vec<(String, String)>;

/// An API call that failed because of its inputs: status, the error text the command line
/// prints, and the input it names (so the page can show it next to that field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status (4xx: the request was at fault).
    pub status: u16,
    /// The message.
    pub message: String,
    /// The input the message is about, when one is.
    pub field: Option<String>,
}

/// The answers behind `/api/*`; each returns the JSON text its command prints with `--json`.
pub trait Api: Send + Sync {
    /// `/api/estimate`: `scaletrain estimate --json` for these flags.
    fn estimate(&self, inputs: &Inputs) -> Result<String, ApiError>;
    /// `/api/plan`: `scaletrain plan --json` for these flags.
    fn plan(&self, inputs: &Inputs) -> Result<String, ApiError>;
    /// `/api/presets`: `scaletrain presets --json`.
    fn presets(&self) -> Result<String, ApiError>;
    /// `/api/validate`: `scaletrain validate --json`.
    fn validate(&self) -> Result<String, ApiError>;
}

/// The page's files: `(path, content type, text)`.
pub const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../page/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../page/app.js"),
    ),
    (
        "/charts.js",
        "text/javascript; charset=utf-8",
        include_str!("../page/charts.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_str!("../page/style.css"),
    ),
];

/// Turns a JSON object body into inputs: strings, numbers and booleans become their text.
pub fn inputs_from_json(body: &[u8]) -> Result<Inputs, ApiError> {
    let bad = |m: String| ApiError {
        status: 400,
        message: m,
        field: None,
    };
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("request body is not JSON: {e}")))?;
    let serde_json::Value::Object(map) = v else {
        return Err(bad(
            "request body must be a JSON object of flags, e.g. {\"model\": \"llama3-8b\", \"gpus\": 16}".into(),
        ));
    };
    map.into_iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                other => {
                    return Err(ApiError {
                        status: 400,
                        message: format!("\"{k}\": {other} is not a string, number or boolean"),
                        field: Some(k),
                    })
                }
            };
            Ok((k, text))
        })
        .collect()
}

fn inputs_of(req: &Request) -> Result<Inputs, ApiError> {
    let mut inputs = http::parse_query(&req.query).map_err(|e| ApiError {
        status: 400,
        message: e.to_string(),
        field: None,
    })?;
    if req.method == "POST" {
        let ctype = req.header("content-type").unwrap_or("");
        if !ctype.starts_with("application/json") {
            return Err(ApiError {
                status: 415,
                message: "POST bodies must be JSON (Content-Type: application/json)".into(),
                field: None,
            });
        }
        inputs.extend(inputs_from_json(&req.body)?);
    }
    Ok(inputs)
}

/// Answers one request: the page's files, or an `/api/*` call through `api`.
pub fn route(req: &Request, api: &dyn Api) -> Response {
    let is_get = req.method == "GET" || req.method == "HEAD";
    if let Some((_, ctype, text)) = ASSETS.iter().find(|(p, _, _)| *p == req.path) {
        if !is_get {
            return Response::error(405, "use GET for the page's files", None);
        }
        return Response {
            status: 200,
            content_type: ctype,
            body: text.as_bytes().to_vec(),
        };
    }
    let answer = match req.path.as_str() {
        "/api/estimate" | "/api/plan" if is_get || req.method == "POST" => {
            inputs_of(req).and_then(|i| {
                if req.path == "/api/plan" {
                    api.plan(&i)
                } else {
                    api.estimate(&i)
                }
            })
        }
        "/api/presets" if is_get => api.presets(),
        "/api/validate" if is_get => api.validate(),
        "/api/estimate" | "/api/plan" => {
            return Response::error(405, "use GET (query string) or POST (JSON body)", None)
        }
        "/api/presets" | "/api/validate" => return Response::error(405, "use GET", None),
        p => {
            return Response::error(
                404,
                &format!(
                    "no such page: {}; the API is /api/estimate, /api/plan, /api/presets, /api/validate",
                    p.chars().take(200).collect::<String>()
                ),
                None,
            )
        }
    };
    match answer {
        Ok(json) => Response::json(200, json),
        Err(e) => Response::error(e.status, &e.message, e.field.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_become_flag_inputs() {
        let mut i =
            inputs_from_json(br#"{"model": "llama3-8b", "gpus": 16, "sequence-parallel": true}"#)
                .unwrap();
        i.sort();
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            i,
            vec![
                pair("gpus", "16"),
                pair("model", "llama3-8b"),
                pair("sequence-parallel", "true")
            ]
        );
        let e = inputs_from_json(br#"{"gpus": [16]}"#).unwrap_err();
        assert_eq!((e.status, e.field.as_deref()), (400, Some("gpus")));
        assert!(inputs_from_json(b"[1]")
            .unwrap_err()
            .message
            .contains("JSON object"));
        assert!(inputs_from_json(b"{\"gpus\": 1e999}")
            .unwrap_err()
            .message
            .contains("not JSON"));
        let deep = "[".repeat(10_000);
        assert_eq!(inputs_from_json(deep.as_bytes()).unwrap_err().status, 400);
    }
}
