//! Import circles between the module files of a crate, found without a Rust parser.
//!
//! Each `.rs` file under a crate's `src` (but `main.rs` and `bin/`, which are other crates)
//! is one module: `src/lib.rs` is the crate root, `src/a.rs` and `src/a/mod.rs` the module
//! `a`, `src/a/b.rs` the module `a::b`. A file imports another when one of its paths names an
//! item of the other: `use crate::…`, `use super::…`, `use self::…`, a `use` of a child
//! module, and the same paths written inline (`crate::store::write_batch(…)`). A path is
//! given to the deepest module file it names: `crate::store::write::CountsKey` is an import
//! of `store/write.rs`, not of `store.rs`. Comments and string literals are left out. Two
//! kinds of paths are not imports:
//!
//! - re-exports (`pub use`, `pub(crate) use`, …): they list what a module offers, and
//!   whoever uses the name depends on the file that defines it;
//! - `mod` declarations: a parent that declares a child does not use it.
//!
//! A circle is a set of files each of which reaches every other by imports (a strongly
//! connected component of more than one file). [`assert_no_circles`] fails naming the files
//! of each circle and, for every import between them, the paths that tie it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// One import between two module files, and the paths that make it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// The importing file, relative to `src`.
    pub from: PathBuf,
    /// The imported file, relative to `src`.
    pub to: PathBuf,
    /// The paths (as `a::b::C`, from the crate root) by which `from` names items of `to`.
    pub paths: BTreeSet<String>,
}

/// A set of files that import one another in a circle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Circle {
    /// The files of the circle, relative to `src`, sorted.
    pub files: Vec<PathBuf>,
    /// Every import between two files of the circle.
    pub imports: Vec<Import>,
}

impl fmt::Display for Circle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        writeln!(f, "circle of {} files: {}", files.len(), files.join(", "))?;
        for i in &self.imports {
            let paths: Vec<&str> = i.paths.iter().map(String::as_str).collect();
            writeln!(
                f,
                "  {} -> {}: {}",
                i.from.display(),
                i.to.display(),
                paths.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The import circles between the module files of the crate whose sources are in `src`
/// (the directory holding `lib.rs`), from the smallest.
pub fn circles(src: &Path) -> std::io::Result<Vec<Circle>> {
    let mut files = BTreeMap::new();
    collect(src, src, &mut files)?;
    Ok(circles_of(&files))
}

/// Fails naming every import circle between the module files of the crate whose sources
/// are in `src`.
///
/// # Panics
///
/// When there is a circle, or `src` cannot be read.
pub fn assert_no_circles(src: &Path) {
    let found = circles(src).unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
    if !found.is_empty() {
        let shown: Vec<String> = found.iter().map(Circle::to_string).collect();
        panic!(
            "{} import circle(s) between the modules of {}: move the names that go back \
             up into a module below both\n{}",
            found.len(),
            src.display(),
            shown.join("")
        );
    }
}

/// The circles of a crate given as its files' sources, by path relative to `src`
/// (`lib.rs`, `a.rs`, `a/b.rs`, ...).
pub fn circles_of(files: &BTreeMap<PathBuf, String>) -> Vec<Circle> {
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .keys()
        .filter_map(|p| module_path(p).map(|m| (m, p.clone())))
        .collect();
    let mut imports: BTreeMap<(PathBuf, PathBuf), BTreeSet<String>> = BTreeMap::new();
    for (file, source) in files {
        let Some(module) = module_path(file) else {
            continue;
        };
        for path in paths_of(source, &module, &modules) {
            let Some(to) = owner(&path, &modules) else {
                continue;
            };
            if to != file {
                imports
                    .entry((file.clone(), to.clone()))
                    .or_default()
                    .insert(path.join("::"));
            }
        }
    }
    let mut found: Vec<Circle> = components(&modules, &imports)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|files| {
            let imports = imports
                .iter()
                .filter(|((a, b), _)| files.contains(a) && files.contains(b))
                .map(|((from, to), paths)| Import {
                    from: from.clone(),
                    to: to.clone(),
                    paths: paths.clone(),
                })
                .collect();
            Circle {
                files: files.into_iter().collect(),
                imports,
            }
        })
        .collect();
    found.sort_by(|a, b| (a.files.len(), &a.files).cmp(&(b.files.len(), &b.files)));
    found
}

fn collect(root: &Path, dir: &Path, files: &mut BTreeMap<PathBuf, String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(root, &path, files)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            files.insert(relative, std::fs::read_to_string(&path)?);
        }
    }
    Ok(())
}

/// The module a file relative to `src` holds; `None` for other crates' roots (`main.rs`,
/// `bin/`).
fn module_path(file: &Path) -> Option<Vec<String>> {
    let mut parts: Vec<String> = file
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    let stem = last.strip_suffix(".rs")?;
    match stem {
        "lib" if parts.is_empty() => {}
        "main" if parts.is_empty() => return None,
        "mod" => {}
        _ => parts.push(stem.to_owned()),
    }
    Some(parts)
}

/// The file of the deepest module that `path` (from the crate root) names.
fn owner<'m>(path: &[String], modules: &'m BTreeMap<Vec<String>, PathBuf>) -> Option<&'m PathBuf> {
    (0..=path.len()).rev().find_map(|n| modules.get(&path[..n]))
}

/// What the lexer keeps of a source: identifiers and the punctuation paths are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Semi,
    Star,
    Dollar,
    LParen,
    RParen,
    Other,
}

/// Tokens of `source`, without comments, string, byte-string and character literals.
fn tokens(source: &str) -> Vec<Token> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&chars, i);
        } else if (c == 'r' || c == 'b')
            && let Some(end) = raw_string_end(&chars, i)
        {
            i = end;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}'), or else a lifetime or label.
            if next == Some('\\') {
                let mut j = i + 2;
                while j < chars.len() && chars[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // `r#ident` is an identifier; `b"…"` and `b'…'` are literals.
            if word == "b" && chars.get(i) == Some(&'\'') {
                let mut j = i + 1;
                if chars.get(j) == Some(&'\\') {
                    j += 1;
                }
                while j < chars.len() && chars[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
                continue;
            }
            out.push(Token::Ident(word));
        } else {
            i += 1;
            out.push(match c {
                ':' if next == Some(':') => {
                    i += 1;
                    Token::PathSep
                }
                '{' => Token::Open,
                '}' => Token::Close,
                ',' => Token::Comma,
                ';' => Token::Semi,
                '*' => Token::Star,
                '$' => Token::Dollar,
                '(' => Token::LParen,
                ')' => Token::RParen,
                c if c.is_whitespace() => continue,
                _ => Token::Other,
            });
        }
    }
    out
}

/// The index after the string literal starting at `start` (a `"`).
fn skip_string(chars: &[char], start: usize) -> usize {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// The index after the raw (byte) string literal starting at `start`, if one does:
/// `r"…"`, `r#"…"#`, `br"…"`, or a byte string `b"…"`.
fn raw_string_end(chars: &[char], start: usize) -> Option<usize> {
    if start > 0 && (chars[start - 1].is_alphanumeric() || chars[start - 1] == '_') {
        return None;
    }
    let mut i = start;
    if chars[i] == 'b' {
        i += 1;
        if chars.get(i) == Some(&'"') {
            return Some(skip_string(chars, i));
        }
    }
    if chars.get(i) != Some(&'r') {
        return None;
    }
    i += 1;
    let mut hashes = 0;
    while chars.get(i) == Some(&'#') {
        hashes += 1;
        i += 1;
    }
    if chars.get(i) != Some(&'"') {
        return None;
    }
    i += 1;
    while i < chars.len() {
        if chars[i] == '"' && (1..=hashes).all(|h| chars.get(i + h) == Some(&'#')) {
            return Some(i + 1 + hashes);
        }
        i += 1;
    }
    Some(i)
}

/// Every path of `source` (the file of `module`) that may name an item of this crate,
/// resolved from the crate root, re-exports left out.
fn paths_of(
    source: &str,
    module: &[String],
    modules: &BTreeMap<Vec<String>, PathBuf>,
) -> Vec<Vec<String>> {
    let toks = tokens(source);
    let mut out = Vec::new();
    // Inline modules (`mod tests { … }`) open at a brace depth.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let here: Vec<String> = module
            .iter()
            .cloned()
            .chain(inline.iter().map(|(m, _)| m.clone()))
            .collect();
        match &toks[i] {
            Token::Open => {
                depth += 1;
                i += 1;
            }
            Token::Close => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                i += 1;
            }
            Token::Ident(w) if w == "mod" => {
                if let (Some(Token::Ident(name)), Some(Token::Open)) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    inline.push((name.clone(), depth));
                    depth += 1;
                    i += 3;
                } else {
                    i += 1;
                }
            }
            Token::Ident(w) if w == "use" => {
                let reexport = is_reexport(&toks, i);
                let mut trees = Vec::new();
                i = use_tree(&toks, i + 1, Vec::new(), &mut trees);
                if !reexport {
                    out.extend(
                        trees
                            .into_iter()
                            .filter_map(|p| resolve(&p, &here, modules)),
                    );
                }
            }
            Token::Ident(w) if i == 0 || !matches!(toks[i - 1], Token::PathSep | Token::Dollar) => {
                // An inline path: `crate::a::b`, `super::x`, `child::f`.
                let first = w.clone();
                let mut path = vec![first];
                let mut j = i + 1;
                while toks.get(j) == Some(&Token::PathSep) {
                    match toks.get(j + 1) {
                        Some(Token::Ident(next)) => {
                            path.push(next.clone());
                            j += 2;
                        }
                        _ => break,
                    }
                }
                if path.len() > 1
                    && let Some(p) = resolve(&path, &here, modules)
                {
                    out.push(p);
                }
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

/// Whether the `use` at `at` is preceded by a visibility (`pub`, `pub(crate)`, ...).
fn is_reexport(toks: &[Token], at: usize) -> bool {
    let mut j = at;
    if j >= 1 && toks[j - 1] == Token::RParen {
        while j > 0 && toks[j - 1] != Token::LParen {
            j -= 1;
        }
        j = j.saturating_sub(1);
    }
    j >= 1 && toks[j - 1] == Token::Ident("pub".to_owned())
}

/// Reads the use tree starting at `i` under `prefix` into `out`; returns the index after it.
fn use_tree(
    toks: &[Token],
    mut i: usize,
    prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let mut path = prefix;
    loop {
        match toks.get(i) {
            Some(Token::Ident(w)) if w == "as" => {
                // `as name`: the alias is not a path.
                i += 2;
            }
            Some(Token::Ident(w)) => {
                path.push(w.clone());
                i += 1;
            }
            Some(Token::PathSep) => i += 1,
            Some(Token::Star) => i += 1,
            Some(Token::Open) => {
                i += 1;
                loop {
                    i = use_tree(toks, i, path.clone(), out);
                    match toks.get(i) {
                        Some(Token::Comma) => i += 1,
                        Some(Token::Close) => {
                            i += 1;
                            break;
                        }
                        _ => break,
                    }
                }
                return i;
            }
            _ => {
                out.push(path);
                // Stop before `,` and `}` (the caller's), after `;`.
                if toks.get(i) == Some(&Token::Semi) {
                    i += 1;
                }
                return i;
            }
        }
    }
}

/// `path` (as written in the module `here`) from the crate root, when it starts in this
/// crate: at `crate`, `super`, `self`, or a child module of `here`.
fn resolve(
    path: &[String],
    here: &[String],
    modules: &BTreeMap<Vec<String>, PathBuf>,
) -> Option<Vec<String>> {
    let (first, rest) = path.split_first()?;
    let mut base: Vec<String> = match first.as_str() {
        "crate" => Vec::new(),
        "self" => here.to_vec(),
        "super" => {
            let mut b = here.to_vec();
            b.pop()?;
            let mut rest = rest;
            while rest.first().is_some_and(|s| s == "super") {
                b.pop()?;
                rest = &rest[1..];
            }
            b.extend(rest.iter().filter(|s| *s != "self").cloned());
            return Some(b);
        }
        _ => {
            let mut child = here.to_vec();
            child.push(first.clone());
            if !modules.contains_key(&child) {
                return None;
            }
            here.to_vec()
        }
    };
    if first != "crate" && first != "self" {
        base.push(first.clone());
    }
    base.extend(rest.iter().filter(|s| *s != "self").cloned());
    Some(base)
}

/// The strongly connected components of the import graph (Tarjan's algorithm).
fn components(
    modules: &BTreeMap<Vec<String>, PathBuf>,
    imports: &BTreeMap<(PathBuf, PathBuf), BTreeSet<String>>,
) -> Vec<BTreeSet<PathBuf>> {
    struct State<'a> {
        edges: BTreeMap<&'a PathBuf, Vec<&'a PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on_stack: BTreeSet<&'a PathBuf>,
        out: Vec<BTreeSet<PathBuf>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a PathBuf) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.edges.get(v).cloned().unwrap_or_default() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.insert(w.clone());
                if w == v {
                    break;
                }
            }
            s.out.push(component);
        }
    }
    let mut state = State {
        edges: BTreeMap::new(),
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for (from, to) in imports.keys() {
        state.edges.entry(from).or_default().push(to);
    }
    for v in modules.values() {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    state.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> BTreeMap<PathBuf, String> {
        files
            .iter()
            .map(|(p, s)| (PathBuf::from(p), (*s).to_owned()))
            .collect()
    }

    fn names(c: &Circle) -> Vec<String> {
        c.files.iter().map(|p| p.display().to_string()).collect()
    }

    #[test]
    fn a_circle_is_found_and_named_with_what_ties_it() {
        let found = circles_of(&tree(&[
            ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\npub mod d;\n"),
            (
                "a.rs",
                "use crate::b::{Thing, other::{self as o}};\npub struct A;\n",
            ),
            ("b.rs", "pub struct Thing;\nfn f() { crate::c::g(); }\n"),
            ("c.rs", "use super::a::A;\npub fn g() {}\n"),
            ("d.rs", "use crate::a::A;\n"),
        ]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(names(&found[0]), ["a.rs", "b.rs", "c.rs"]);
        let shown = found[0].to_string();
        assert!(
            shown.contains("a.rs -> b.rs: b::Thing, b::other"),
            "{shown}"
        );
        assert!(shown.contains("b.rs -> c.rs: c::g"), "{shown}");
        assert!(shown.contains("c.rs -> a.rs: a::A"), "{shown}");
        let caught = std::panic::catch_unwind(|| {
            let dir = std::env::temp_dir().join(crate::unique("layering"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
            std::fs::write(dir.join("a.rs"), "use crate::b::B;\npub struct A;\n").unwrap();
            std::fs::write(dir.join("b.rs"), "use crate::a::A;\npub struct B;\n").unwrap();
            assert_no_circles(&dir);
        });
        assert!(caught.is_err(), "assert_no_circles passed a circle");
    }

    #[test]
    fn a_path_belongs_to_the_deepest_module_it_names() {
        // The parent calls its child and the child takes a name of the parent: a circle.
        let found = circles_of(&tree(&[
            ("lib.rs", "pub mod store;\n"),
            (
                "store.rs",
                "mod write;\npub struct Error;\npub fn f() { write::go() }\n",
            ),
            ("store/write.rs", "use super::Error;\npub fn go() {}\n"),
        ]));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(names(&found[0]), ["store/write.rs", "store.rs"]);
        // A name the child defines, reached through the parent's path, is the child's.
        let found = circles_of(&tree(&[
            ("lib.rs", "pub mod store;\npub mod api;\n"),
            ("store.rs", "pub mod write;\n"),
            ("store/write.rs", "pub fn go() {}\n"),
            ("store/error.rs", "use crate::store::write::go;\n"),
            ("api.rs", "use crate::store::write::go;\n"),
        ]));
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn reexports_comments_strings_and_tests_are_not_imports() {
        let found = circles_of(&tree(&[
            (
                "lib.rs",
                "pub mod store;\npub mod ingest;\npub use store::Error;\n",
            ),
            (
                "store.rs",
                "mod write;\npub(crate) use write::go;\npub use self::write::Row;\n\
                 /// Called by [`crate::ingest::run`].\npub struct Error;\n\
                 const DOC: &str = \"crate::ingest::run\";\n\
                 const RAW: &str = r#\"use crate::ingest::run;\"#;\n\
                 const C: char = '\"'; // crate::ingest\n\
                 /* crate::ingest::run */\n\
                 #[cfg(test)]\nmod tests {\n    use super::*;\n    fn t() -> Error { Error }\n}\n",
            ),
            (
                "store/write.rs",
                "use super::Error;\npub fn go() {}\npub struct Row;\n",
            ),
            (
                "ingest.rs",
                "use crate::store;\npub fn run() { store::go(); }\n",
            ),
            ("main.rs", "use crate::ingest::run;\nmod cli;\n"),
        ]));
        assert!(found.is_empty(), "{found:?}");
    }
}
