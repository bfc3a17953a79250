//! Fetching a model's files from the hub into the cache: metadata from the redirect's headers,
//! bodies written as blobs, snapshot links, `.no_exist` markers.

use super::*;

/// What the hub said about a file.
#[derive(Default, Debug)]
pub(super) struct FileMeta {
    commit: Option<String>,
    etag: Option<String>,
    size: Option<u64>,
}

pub(super) enum Opened {
    /// The body is in this response.
    Body(FetchResponse, String),
    /// The body is behind this off-hub redirect (e.g. the LFS CDN).
    Redirect(String),
}

pub(super) enum Fetched {
    Found(PathBuf),
    NotFound,
}

pub(super) struct Downloader<'a> {
    opts: &'a HubOptions,
    fetcher: &'a dyn Fetch,
    cache: &'a CacheRepo,
    repo_id: &'a str,
    revision: &'a str,
    /// Once known, every further file is fetched at this exact commit.
    pub(super) commit: Option<String>,
}

impl<'a> Downloader<'a> {
    pub(super) fn new(
        opts: &'a HubOptions,
        fetcher: &'a dyn Fetch,
        cache: &'a CacheRepo,
        repo_id: &'a str,
        revision: &'a str,
    ) -> Self {
        Downloader {
            opts,
            fetcher,
            cache,
            repo_id,
            revision,
            commit: None,
        }
    }

    pub(super) fn download_model(&mut self, need_weights: bool) -> Result<ModelFiles, HubError> {
        if self.ensure(CONFIG_FILE)?.is_none() {
            return Err(self.missing_remote(CONFIG_FILE));
        }
        let mut have_weights = self.ensure(SAFETENSORS_FILE)?.is_some();
        if !have_weights {
            if let Some(index) = self.ensure(SAFETENSORS_INDEX_FILE)? {
                for shard in read_index_shards(&index)? {
                    if self.ensure(&shard)?.is_none() {
                        return Err(self.missing_remote(&format!(
                            "{shard} (a shard named by {SAFETENSORS_INDEX_FILE})"
                        )));
                    }
                }
                have_weights = true;
            }
        }
        if !have_weights {
            have_weights = self.ensure(PYTORCH_FILE)?.is_some();
        }
        if !have_weights && need_weights {
            return Err(HubError::NoWeights {
                what: format!("model '{}' (revision '{}')", self.repo_id, self.revision),
            });
        }
        // timm's repositories keep their transform in config.json's `pretrained_cfg`.
        let timm = self
            .commit
            .as_deref()
            .and_then(|c| self.cache.cached_file(c, CONFIG_FILE))
            .is_some_and(|p| is_timm_config_file(&p));
        if !timm {
            self.ensure(PREPROCESSOR_FILE)?;
        }
        // Fetching config.json set the commit; this guard only avoids a panic path.
        let Some(commit) = self.commit.clone() else {
            return Err(self.missing_remote(CONFIG_FILE));
        };
        ModelFiles::scan(
            &self.cache.snapshot_dir(&commit),
            ModelSource::Hub {
                repo_id: self.repo_id.to_string(),
                revision: self.revision.to_string(),
                commit,
            },
        )
    }

    fn missing_remote(&self, file: &str) -> HubError {
        HubError::MissingRemoteFile {
            repo_id: self.repo_id.to_string(),
            revision: self.revision.to_string(),
            file: file.to_string(),
        }
    }

    fn unreachable(&self, file: &str, e: FetchError) -> HubError {
        HubError::Unreachable {
            repo_id: self.repo_id.to_string(),
            file: file.to_string(),
            endpoint: self.opts.endpoint.clone(),
            reason: e.0,
        }
    }

    /// The cached file, or downloads it; `None` if the hub says it does not exist.
    pub(super) fn ensure(&mut self, file: &str) -> Result<Option<PathBuf>, HubError> {
        if let Some(commit) = &self.commit {
            if let Some(p) = self.cache.cached_file(commit, file) {
                return Ok(Some(p));
            }
            if self.cache.known_missing(commit, file) {
                return Ok(None);
            }
        }
        match self.fetch(file)? {
            Fetched::Found(p) => Ok(Some(p)),
            Fetched::NotFound => Ok(None),
        }
    }

    fn fetch(&mut self, file: &str) -> Result<Fetched, HubError> {
        let rev = self
            .commit
            .clone()
            .unwrap_or_else(|| self.revision.to_string());
        let url = resolve_url(&self.opts.endpoint, self.repo_id, &rev, file);
        let (meta, opened) = match self.open(file, url)? {
            Ok(x) => x,
            Err(not_found_commit) => {
                if let Some(c) = not_found_commit {
                    self.cache.mark_missing(&c, file)?;
                    self.cache.write_ref(self.revision, &c)?;
                    self.commit.get_or_insert(c);
                }
                return Ok(Fetched::NotFound);
            }
        };
        let bad = |reason: &str, url: &str| HubError::BadResponse {
            repo_id: self.repo_id.to_string(),
            file: file.to_string(),
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let commit = match meta.commit {
            Some(c) if is_commit_hash(&c) => c,
            _ => {
                return Err(bad(
                    "no valid X-Repo-Commit header; the endpoint is not a Hugging Face hub",
                    &self.opts.endpoint,
                ))
            }
        };
        let etag = match meta.etag.map(|e| normalize_etag(&e)) {
            Some(e) if is_valid_relative_file(&e) && !e.contains('/') => e,
            _ => {
                return Err(bad(
                    "no usable ETag / X-Linked-Etag header",
                    &self.opts.endpoint,
                ))
            }
        };
        self.cache.tag_cache_root();
        self.cache.write_ref(self.revision, &commit)?;
        if let Some(known) = &self.commit {
            if *known != commit {
                return Err(bad(
                    &format!("commit changed from {known} to {commit} while fetching"),
                    &self.opts.endpoint,
                ));
            }
        }
        self.commit = Some(commit.clone());

        if !self.cache.blob_path(&etag).is_file() {
            let (mut resp, url) = match opened {
                Opened::Body(resp, url) => (resp, url),
                Opened::Redirect(url) => self.follow(file, url)?,
            };
            let size = meta.size.or_else(|| {
                resp.header("content-length")
                    .and_then(|v| v.trim().parse().ok())
            });
            let limit = download_limit(file, size).map_err(|reason| bad(&reason, &url))?;
            let bar = self.progress_bar(file, size);
            let result = self
                .cache
                .write_blob(&etag, &mut resp.body, size, limit, &mut |n| {
                    if let Some(b) = &bar {
                        b.set_position(n)
                    }
                });
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            match result {
                Ok(_) => {}
                Err(WriteBlobError::Io { path, source }) => {
                    return Err(HubError::Io { path, source })
                }
                Err(e @ WriteBlobError::Busy(_)) => {
                    return Err(HubError::Io {
                        path: self.cache.blob_path(&etag),
                        source: io::Error::new(io::ErrorKind::ResourceBusy, e.to_string()),
                    })
                }
                Err(e @ WriteBlobError::TooLarge { .. }) => return Err(bad(&e.to_string(), &url)),
                Err(WriteBlobError::Transfer(reason)) => {
                    return Err(HubError::Unreachable {
                        repo_id: self.repo_id.to_string(),
                        file: file.to_string(),
                        endpoint: url,
                        reason,
                    })
                }
                Err(WriteBlobError::Corrupt(reason)) => {
                    return Err(HubError::Corrupt {
                        repo_id: self.repo_id.to_string(),
                        file: file.to_string(),
                        reason,
                    })
                }
            }
        }
        let pointer = self.cache.link_snapshot(&commit, file, &etag)?;
        Ok(Fetched::Found(pointer))
    }

    fn progress_bar(&self, file: &str, size: Option<u64>) -> Option<indicatif::ProgressBar> {
        let size = size?;
        if !self.opts.progress || size < PROGRESS_MIN_BYTES {
            return None;
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(size),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("{}/{}", self.repo_id, file));
        Some(bar)
    }

    /// Requests a file on the hub, following hub-internal redirects and collecting the
    /// metadata headers. `Err(commit)` (inner) means the file does not exist.
    #[allow(clippy::type_complexity)]
    fn open(
        &self,
        file: &str,
        mut url: String,
    ) -> Result<Result<(FileMeta, Opened), Option<String>>, HubError> {
        let origin = url_origin(&self.opts.endpoint);
        let auth = self.opts.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut meta = FileMeta::default();
        for _ in 0..=MAX_REDIRECTS {
            let mut headers = vec![("Accept-Encoding", "identity")];
            if let Some(a) = &auth {
                headers.push(("Authorization", a.as_str()));
            }
            let resp = self
                .fetcher
                .get(&url, &headers)
                .map_err(|e| self.unreachable(file, e))?;
            if let Some(c) = resp.header("x-repo-commit") {
                meta.commit = Some(c.trim().to_string());
            }
            if let Some(e) = resp.header("x-linked-etag").or(resp.header("etag")) {
                meta.etag = Some(e.trim().to_string());
            }
            let is_redirect = (300..400).contains(&resp.status);
            if let Some(s) = resp.header("x-linked-size").or(if is_redirect {
                None
            } else {
                resp.header("content-length")
            }) {
                meta.size = s.trim().parse().ok();
            }
            match resp.status {
                200..=299 => return Ok(Ok((meta, Opened::Body(resp, url)))),
                301 | 302 | 303 | 307 | 308 => {
                    let Some(loc) = resp.header("location") else {
                        return Err(HubError::BadResponse {
                            repo_id: self.repo_id.to_string(),
                            file: file.to_string(),
                            url,
                            reason: format!("HTTP {} without a Location header", resp.status),
                        });
                    };
                    let next = resolve_location(&url, loc);
                    if url_origin(&next) == origin {
                        url = next; // hub-internal (renamed repo, resolve-cache): keep going
                    } else {
                        return Ok(Ok((meta, Opened::Redirect(next))));
                    }
                }
                status => return self.status_error(file, &url, status, &resp, meta.commit),
            }
        }
        Err(HubError::BadResponse {
            repo_id: self.repo_id.to_string(),
            file: file.to_string(),
            url,
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    #[allow(clippy::type_complexity)]
    fn status_error(
        &self,
        file: &str,
        url: &str,
        status: u16,
        resp: &FetchResponse,
        commit: Option<String>,
    ) -> Result<Result<(FileMeta, Opened), Option<String>>, HubError> {
        let code = resp.header("x-error-code").unwrap_or("");
        let endpoint = self.opts.endpoint.clone();
        let repo_id = self.repo_id.to_string();
        Err(match (status, code) {
            (_, "RepoNotFound") | (401, _) => HubError::RepoNotFound {
                repo_id,
                endpoint,
                status,
            },
            (_, "RevisionNotFound") => HubError::RevisionNotFound {
                repo_id,
                revision: self.revision.to_string(),
                endpoint,
            },
            (_, "GatedRepo") | (403, _) => HubError::AccessDenied {
                repo_id,
                file: file.to_string(),
                endpoint,
                status,
            },
            (404, _) => return Ok(Err(commit.filter(|c| is_commit_hash(c)))),
            _ => HubError::Http {
                repo_id,
                file: file.to_string(),
                url: url.to_string(),
                status,
            },
        })
    }

    /// Follows off-hub redirects (no token sent) to the body.
    fn follow(&self, file: &str, mut url: String) -> Result<(FetchResponse, String), HubError> {
        for _ in 0..=MAX_REDIRECTS {
            let resp = self
                .fetcher
                .get(&url, &[("Accept-Encoding", "identity")])
                .map_err(|e| HubError::Unreachable {
                    repo_id: self.repo_id.to_string(),
                    file: file.to_string(),
                    endpoint: url_origin(&url).unwrap_or_else(|| url.clone()),
                    reason: e.0,
                })?;
            match resp.status {
                200..=299 => return Ok((resp, url)),
                301 | 302 | 303 | 307 | 308 => match resp.header("location") {
                    Some(loc) => url = resolve_location(&url, loc),
                    None => break,
                },
                status => {
                    return Err(HubError::Http {
                        repo_id: self.repo_id.to_string(),
                        file: file.to_string(),
                        url,
                        status,
                    })
                }
            }
        }
        Err(HubError::BadResponse {
            repo_id: self.repo_id.to_string(),
            file: file.to_string(),
            url,
            reason: "redirect loop or redirect without Location".to_string(),
        })
    }
}
