//! External programs the tests drive (Envoy, Caddy, Traefik, nginx, OpenBao): finding their
//! binaries, killing them when the test is done, and reading their configurations from
//! docs/gateways.md, so the page and the tests cannot drift.

use std::path::{Path, PathBuf};
use std::process::Child;

/// `~/.cache/jitbroker/tools/bin/<name>`, where scripts/tools.sh installs tools.
pub fn tools_cache(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(
        Path::new(&home)
            .join(".cache/jitbroker/tools/bin")
            .join(name),
    )
}

/// A tool's binary: `JITBROKER_<NAME>`, then `name` on PATH, then `fallback` if it is a file.
/// `None` skips the test unless `JITBROKER_REQUIRE_<NAME>=1` (scripts/test.sh sets them);
/// `install` says how to get the tool.
pub fn binary(name: &str, fallback: Option<PathBuf>, install: &str) -> Option<PathBuf> {
    let upper = name.to_ascii_uppercase();
    let found = std::env::var_os(format!("JITBROKER_{upper}"))
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(name))
                    .find(|f| f.is_file())
            })
        })
        .or_else(|| fallback.filter(|f| f.is_file()));
    if found.is_none() {
        assert!(
            std::env::var(format!("JITBROKER_REQUIRE_{upper}")).as_deref() != Ok("1"),
            "JITBROKER_REQUIRE_{upper}=1 but no {name} binary ({install})"
        );
        eprintln!("skipping: no {name} binary ({install})");
    }
    found
}

/// A child process, killed (and waited for) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fenced block after `<!-- marker -->` in docs/gateways.md.
pub fn docs_block(marker: &str, lang: &str) -> String {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/gateways.md"))
            .unwrap();
    let fence = format!("<!-- {marker} -->\n```{lang}\n");
    let start = page
        .find(&fence)
        .unwrap_or_else(|| panic!("docs/gateways.md has no {fence:?}"));
    let body = &page[start + fence.len()..];
    body[..body.find("```").unwrap()].to_owned()
}

/// Replaces each `from` (which must be there) by `to` in `text`, the `what` of docs/gateways.md.
pub fn replace_all(mut text: String, what: &str, pairs: &[(String, String)]) -> String {
    for (from, to) in pairs {
        assert!(
            text.contains(from.as_str()),
            "docs/gateways.md {what} lost {from:?}"
        );
        text = text.replace(from.as_str(), to);
    }
    text
}
