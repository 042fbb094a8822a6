//! Every relative link in README.md and docs/*.md points at a file of this
//! repository, and every `#anchor` into a Markdown file names one of its
//! headings (as GitHub spells heading anchors). Links to the web are not
//! fetched. A moved or renamed doc, picture or source file fails here.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every docs/*.md.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).expect("docs/") {
        let path = entry.expect("docs/ entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push(path);
        }
    }
    docs.sort();
    docs
}

/// The lines of `text` outside fenced code blocks, numbered from 1.
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push((n + 1, line));
        }
    }
    out
}

/// Targets of inline links and images, `[text](target)`, and of reference
/// definitions, `[name]: target`, on one line.
fn link_targets(line: &str) -> Vec<&str> {
    let mut targets = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let end = after.find([')', ' ']).unwrap_or(after.len());
        targets.push(&after[..end]);
        rest = &after[end..];
    }
    if let Some(definition) = line.trim_start().strip_prefix('[')
        && let Some((_, target)) = definition.split_once("]: ")
    {
        targets.push(target.split_whitespace().next().unwrap_or_default());
    }
    targets
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings.
fn anchors(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).expect("read linked Markdown file");
    prose(&text)
        .into_iter()
        .filter_map(|(_, line)| {
            let hashes = line.len() - line.trim_start_matches('#').len();
            (1..=6).contains(&hashes).then(|| &line[hashes..])
        })
        .filter(|heading| heading.starts_with(' '))
        .map(anchor)
        .collect()
}

/// Every broken relative link of one document, as "file:line: target: why".
fn broken_links(doc: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(doc).expect("read document");
    let dir = doc.parent().expect("document folder");
    let name = doc
        .strip_prefix(root())
        .unwrap_or(doc)
        .display()
        .to_string();
    let mut broken = Vec::new();
    for (n, line) in prose(&text) {
        for target in link_targets(line) {
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, fragment) = match target.split_once('#') {
                Some((file, fragment)) => (file, Some(fragment)),
                None => (target, None),
            };
            let path = if file.is_empty() {
                doc.to_path_buf()
            } else {
                dir.join(file)
            };
            if !path.exists() {
                broken.push(format!("{name}:{n}: {target}: no such file"));
            } else if let Some(fragment) = fragment
                && path.extension().is_some_and(|e| e == "md")
                && !anchors(&path).contains(fragment)
            {
                broken.push(format!("{name}:{n}: {target}: no such heading"));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let docs = documents();
    assert!(
        docs.len() > 5,
        "expected README.md and the docs/ pages, found {docs:?}"
    );
    let broken: Vec<String> = docs.iter().flat_map(|d| broken_links(d)).collect();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_checker_finds_links_and_anchors() {
    assert_eq!(
        link_targets("see [a](x.md), ![b](img.png \"t\") and [`c`](../src/c.rs#L1)"),
        ["x.md", "img.png", "../src/c.rs#L1"]
    );
    assert_eq!(link_targets("[ref]: docs/api.md"), ["docs/api.md"]);
    assert_eq!(anchor("Racing replicas"), "racing-replicas");
    assert_eq!(
        anchor("S3 conditional writes, and what Garage 2.5 does with them"),
        "s3-conditional-writes-and-what-garage-25-does-with-them"
    );
    assert_eq!(
        anchor("1. What the guard sees: `memgate limits`"),
        "1-what-the-guard-sees-memgate-limits"
    );
}
