//! The layout as a graph: which source file of a crate refers to which other (through `use`
//! declarations and `crate::`/`super::` paths), so tests can hold the architecture's rules: no
//! import cycles between files, and the control plane importing nothing from the node side.
//!
//! Files are modules (`a/b.rs` and `a/b/mod.rs` are `a::b`, `lib.rs` and `main.rs` the root;
//! `src/bin` is left out). A path resolves to the deepest file module it names. What follows
//! `#[cfg(test)] mod tests` in a file is left out: test modules are not part of the layout.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// A file module: its path segments (`["control", "ops", "services"]`; empty for the root).
pub type Module = Vec<String>;

/// File module → (referenced file module → one path that refers to it).
pub type Graph = BTreeMap<Module, BTreeMap<Module, String>>;

/// The source of every file module under `src` (a crate's `src` directory).
pub fn read_crate(src: &Path) -> std::io::Result<BTreeMap<Module, String>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir)? {
            let path = e?.path();
            let rel = path.strip_prefix(src).expect("below src");
            if rel.starts_with("bin") {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let mut module: Module = rel
                .with_extension("")
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect();
            if module.last().is_some_and(|l| l == "mod") {
                module.pop();
            }
            if module == ["lib"] || module == ["main"] {
                module.clear();
            }
            out.insert(module, std::fs::read_to_string(&path)?);
        }
    }
    Ok(out)
}

/// The source without comments and without its test module.
fn shipped(src: &str) -> String {
    let code: String = src
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut cut = code.len();
    let mut from = 0;
    while let Some(i) = code[from..].find("#[cfg(test)]") {
        let at = from + i;
        if code[at + 12..].trim_start().starts_with("mod tests") {
            cut = at;
            break;
        }
        from = at + 12;
    }
    code[..cut].to_string()
}

/// Every full path of a use tree (`a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`).
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        return vec![path.to_string()];
    };
    let prefix = tree[..open].trim().trim_end_matches("::");
    let inner = tree[open + 1..].trim_end().trim_end_matches('}');
    let (mut parts, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    let mut out = Vec::new();
    for p in parts.iter().filter(|p| !p.trim().is_empty()) {
        for e in expand(p) {
            out.push(match (prefix.is_empty(), e.as_str()) {
                (true, _) => e,
                (false, "self") => prefix.to_string(),
                (false, _) => format!("{prefix}::{e}"),
            });
        }
    }
    out
}

/// The paths a file refers to: its use declarations, expanded, and `crate::…`/`super::…` paths.
fn references(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let bytes = code.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while let Some(at) = code[i..].find("use ") {
        let start = i + at;
        i = start + 4;
        if start > 0 && ident(bytes[start - 1]) {
            continue;
        }
        if let Some(end) = code[i..].find(';') {
            refs.extend(expand(&code[i..i + end]));
        }
    }
    for root in ["crate::", "super::"] {
        let mut i = 0;
        while let Some(at) = code[i..].find(root) {
            let start = i + at;
            i = start + root.len();
            if start > 0 && ident(bytes[start - 1]) {
                continue;
            }
            let end = code[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| start + e);
            let path = code[start..end].trim_end_matches(':');
            // `crate::{…}` and `super::{…}` are use trees, expanded above.
            if path.split("::").any(|s| !matches!(s, "crate" | "super")) {
                refs.insert(path.to_string());
            }
        }
    }
    refs
}

/// The file module a path names from `module`, if it names one other than the root's items.
fn resolve(files: &BTreeMap<Module, String>, module: &Module, path: &str) -> Option<Module> {
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Module = match segs.first().copied()? {
        "crate" => {
            segs.remove(0);
            Vec::new()
        }
        "super" => {
            let mut b = module.clone();
            while segs.first() == Some(&"super") {
                segs.remove(0);
                b.pop();
            }
            b
        }
        "self" => {
            segs.remove(0);
            module.clone()
        }
        first => {
            // A child module named relative to this one; anything else is another crate.
            let mut child = module.clone();
            child.push(first.to_string());
            if !files.contains_key(&child) {
                return None;
            }
            module.clone()
        }
    };
    let floor = base.len();
    base.extend(segs.iter().map(|s| s.to_string()));
    (floor..=base.len())
        .rev()
        .map(|n| base[..n].to_vec())
        .find(|m| files.contains_key(m))
}

/// The reference graph of a crate's files.
pub fn graph(files: &BTreeMap<Module, String>) -> Graph {
    let mut g = Graph::new();
    for (module, src) in files {
        let edges = g.entry(module.clone()).or_default();
        for r in references(&shipped(src)) {
            if let Some(to) = resolve(files, module, &r)
                && &to != module
            {
                edges.entry(to).or_insert(r);
            }
        }
    }
    g
}

/// Every cycle's files (strongly connected components of more than one file), each sorted.
pub fn cycles(g: &Graph) -> Vec<Vec<Module>> {
    // Tarjan's algorithm, iteratively deep enough for a crate: recursion is fine at this size.
    struct Walk<'g> {
        g: &'g Graph,
        index: BTreeMap<&'g Module, usize>,
        low: BTreeMap<&'g Module, usize>,
        stack: Vec<&'g Module>,
        on: BTreeSet<&'g Module>,
        out: Vec<Vec<Module>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, v: &'g Module) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.g.get(v).into_iter().flat_map(|e| e.keys()) {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    comp.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut w = Walk {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !w.index.contains_key(v) {
            w.visit(v);
        }
    }
    w.out
}

/// A cycle as text, with the path behind each edge inside it.
pub fn describe(g: &Graph, cycle: &[Module]) -> String {
    let name = |m: &Module| {
        if m.is_empty() {
            "(root)".to_string()
        } else {
            m.join("/")
        }
    };
    let mut s = String::new();
    for a in cycle {
        for (b, via) in g.get(a).into_iter().flatten() {
            if cycle.contains(b) {
                s.push_str(&format!("  {} -> {} ({via})\n", name(a), name(b)));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(src: &[(&str, &str)]) -> BTreeMap<Module, String> {
        src.iter()
            .map(|(m, s)| {
                let module = m
                    .split('/')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect();
                (module, s.to_string())
            })
            .collect()
    }

    #[test]
    fn use_trees_expand_to_full_paths() {
        assert_eq!(
            expand("super::{Caller, accounts::join, ops::{self, x as y}}"),
            [
                "super::Caller",
                "super::accounts::join",
                "super::ops",
                "super::ops::x"
            ]
        );
    }

    #[test]
    fn a_cycle_through_super_and_crate_paths_is_found_and_a_chain_is_not() {
        let f = files(&[
            ("", "pub mod a;"),
            ("a", "pub mod b; pub mod c;"),
            ("a/b", "use super::c::f; fn g() { f() }"),
            ("a/c", "pub fn f() { crate::a::b::h() }"),
            (
                "d",
                "use crate::a::{b::h, c}; #[cfg(test)]\nmod tests { use crate::e; }",
            ),
            ("e", "fn x() { crate::d::y() }"),
        ]);
        let g = graph(&f);
        let c = cycles(&g);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0], [vec!["a", "b"], vec!["a", "c"]]);
        assert!(describe(&g, &c[0]).contains("a/b -> a/c (super::c::f)"));
        // `d`'s test module refers to `e`, which refers to `d`: not a cycle of shipped code.
        assert!(!g[&vec!["d".to_string()]].contains_key(&vec!["e".to_string()]));
    }

    fn crate_graph(dir: &str) -> Graph {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
        let files = read_crate(&src).expect("reading the crate");
        assert!(files.len() > 10, "{dir}: only {} files", files.len());
        graph(&files)
    }

    #[test]
    fn no_file_of_the_agent_or_the_datapath_is_part_of_an_import_cycle() {
        for dir in ["privatelink-agent/src", "privatelink-ebpf/src"] {
            let g = crate_graph(dir);
            let edges: usize = g.values().map(BTreeMap::len).sum();
            assert!(edges > 50, "{dir}: only {edges} references found");
            let found: Vec<String> = cycles(&g).iter().map(|c| describe(&g, c)).collect();
            assert!(
                found.is_empty(),
                "{dir}: import cycles:\n{}",
                found.join("\n")
            );
        }
    }

    #[test]
    fn the_control_plane_imports_nothing_of_the_node_side_and_the_cli_only_the_wire_types() {
        let g = crate_graph("privatelink-agent/src");
        let mut wrong = Vec::new();
        for (from, edges) in &g {
            for (to, via) in edges {
                let (f, t) = (
                    from.first().map_or("", String::as_str),
                    to.first().map_or("", String::as_str),
                );
                let allowed: &[&str] = match f {
                    "control" => &["control", "wire"],
                    "cli" => &["cli", "wire"],
                    "datapath" => &["datapath"],
                    "node" => &["node", "control", "datapath", "wire"],
                    "wire" => &["wire"],
                    _ => continue,
                };
                if !allowed.contains(&t) {
                    wrong.push(format!("{} -> {} ({via})", from.join("/"), to.join("/")));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
