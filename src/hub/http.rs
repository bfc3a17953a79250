//! The HTTP transport behind [`Fetch`] and the hub's URLs.

use super::*;

/// One HTTP answer: status, headers (names as sent, compared case-insensitively), body.
pub struct FetchResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// The body, streamed.
    pub body: Box<dyn Read + Send>,
}

impl fmt::Debug for FetchResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl FetchResponse {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A transport failure: nothing usable came back (DNS, connect, TLS, timeout...).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// The HTTP transport: one GET, **without** following redirects (the hub metadata lives in the
/// headers of the redirect itself) and without treating error statuses as errors.
pub trait Fetch {
    /// Sends `GET url` with the given headers.
    fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<FetchResponse, FetchError>;
}

/// The real transport, on `ureq` with rustls.
#[cfg(feature = "download")]
pub struct UreqFetcher {
    agent: ureq::Agent,
}

#[cfg(feature = "download")]
impl UreqFetcher {
    /// A client with a 10 s connect timeout, 60 s to the first response byte and 60 s at most
    /// for any one read (a stalled transfer fails instead of hanging), honouring
    /// `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`.
    pub fn new() -> Self {
        use std::time::Duration;
        Self::with_timeouts(Duration::from_secs(10), Duration::from_secs(60))
    }

    /// A client with these connect and read timeouts (the read one also bounds the wait for
    /// the response and each read of the body).
    pub fn with_timeouts(connect: std::time::Duration, read: std::time::Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(connect))
            .timeout_recv_response(Some(read))
            .timeout_per_read(Some(read))
            .user_agent(concat!("beit-rs/", env!("CARGO_PKG_VERSION")))
            .build();
        UreqFetcher {
            agent: config.into(),
        }
    }
}

#[cfg(feature = "download")]
impl Default for UreqFetcher {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "download")]
impl Fetch for UreqFetcher {
    fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<FetchResponse, FetchError> {
        let mut req = self.agent.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.call().map_err(|e| FetchError(e.to_string()))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = resp.into_body().into_reader();
        Ok(FetchResponse {
            status,
            headers,
            body: Box::new(body),
        })
    }
}

/// `scheme://host[:port]` of a URL, lowercased.
pub(super) fn url_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    Some(format!("{}://{}", scheme, host).to_ascii_lowercase())
}

/// Resolves a `Location` header against the URL that sent it.
pub(super) fn resolve_location(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let origin_end = base
        .find("://")
        .map(|i| i + 3 + base[i + 3..].find('/').unwrap_or(base.len() - i - 3))
        .unwrap_or(base.len());
    if let Some(rest) = location.strip_prefix("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        return format!("{scheme}://{rest}");
    }
    if location.starts_with('/') {
        return format!("{}{}", &base[..origin_end], location);
    }
    let path = &base[..base.find(['?', '#']).unwrap_or(base.len())];
    match path.rfind('/') {
        Some(i) if i >= origin_end => format!("{}{}", &path[..=i], location),
        _ => format!("{}/{}", &base[..origin_end], location),
    }
}

/// Percent-encodes everything but unreserved characters (and `/` when `keep_slash`).
pub(super) fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `hf_hub_url`: `{endpoint}/{repo_id}/resolve/{revision}/{file}` with the revision fully
/// percent-encoded (so `refs/pr/1` stays one path segment).
pub fn resolve_url(endpoint: &str, repo_id: &str, revision: &str, file: &str) -> String {
    format!(
        "{}/{}/resolve/{}/{}",
        endpoint.trim_end_matches('/'),
        repo_id,
        percent_encode(revision, false),
        percent_encode(file, true)
    )
}
