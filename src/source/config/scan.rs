//! Locating errors in a TOML text: a small scan that maps every key path
//! (such as `service[1].publish[0].port`) to its byte offsets, and byte
//! offsets to line numbers. Best effort: it stops quietly at anything it
//! does not understand (the real parser reports that).

use std::collections::BTreeMap;

#[allow(
    clippy::naive_bytecount,
    reason = "one count per error message, over a config file"
)]
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Where each key path of a TOML text sits: `(path, start, end)` byte
/// offsets, in document order. A best-effort scan used only to locate
/// errors; it stops quietly at anything it does not understand (the
/// real parser reports that).
pub(super) struct KeyIndex {
    pub(super) entries: Vec<(String, usize, usize)>,
}

impl KeyIndex {
    pub(super) fn scan(text: &str) -> KeyIndex {
        let mut s = Scanner {
            b: text.as_bytes(),
            i: 0,
            entries: Vec::new(),
            arrays: BTreeMap::new(),
        };
        s.document();
        KeyIndex { entries: s.entries }
    }

    /// The innermost entry containing `offset`.
    pub(super) fn path_at(&self, offset: usize) -> Option<String> {
        self.entries
            .iter()
            .filter(|(_, start, end)| *start <= offset && offset < *end)
            .max_by_key(|(_, start, _)| *start)
            .map(|(p, _, _)| p.clone())
    }

    /// Where `path`, or its nearest written ancestor, starts.
    pub(super) fn offset_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some((_, start, _)) = self.entries.iter().find(|(q, _, _)| q == p) {
                return Some(*start);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    entries: Vec<(String, usize, usize)>,
    /// Array-of-tables path -> number of tables seen so far.
    arrays: BTreeMap<String, usize>,
}

type Scan<T> = Option<T>;

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn starts(&self, s: &str) -> bool {
        self.b[self.i..].starts_with(s.as_bytes())
    }

    fn skip_blank(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\r' => self.i += 1,
                b'\n' if newlines => self.i += 1,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.i += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn document(&mut self) -> Scan<()> {
        let mut base = String::new();
        loop {
            self.skip_blank(true);
            let start = self.i;
            match self.peek() {
                None => return Some(()),
                Some(b'[') => {
                    let aot = self.starts("[[");
                    self.i += if aot { 2 } else { 1 };
                    let keys = self.key()?;
                    self.skip_blank(false);
                    if !self.starts(if aot { "]]" } else { "]" }) {
                        return None;
                    }
                    self.i += if aot { 2 } else { 1 };
                    base = self.resolve(&keys, aot);
                    // A table header's entry spans the whole table.
                    let end = self.next_header();
                    self.entries.push((base.clone(), start, end));
                }
                Some(_) => self.key_value(&base)?,
            }
        }
    }

    /// Offset of the next line that starts a table header.
    fn next_header(&self) -> usize {
        let mut j = self.i;
        while j < self.b.len() {
            if self.b[j] == b'\n' {
                let mut k = j + 1;
                while k < self.b.len() && matches!(self.b[k], b' ' | b'\t') {
                    k += 1;
                }
                if self.b.get(k) == Some(&b'[') {
                    return k;
                }
            }
            j += 1;
        }
        self.b.len()
    }

    /// Turn header keys into a path, numbering arrays of tables.
    fn resolve(&mut self, keys: &[String], aot: bool) -> String {
        let mut path = String::new();
        for (n, k) in keys.iter().enumerate() {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(k);
            let last = n + 1 == keys.len();
            if last && aot {
                let count = self.arrays.entry(path.clone()).or_insert(0);
                *count += 1;
                path = format!("{path}[{}]", *count - 1);
            } else if let Some(count) = self.arrays.get(&path) {
                path = format!("{path}[{}]", count.saturating_sub(1));
            }
        }
        path
    }

    fn key(&mut self) -> Scan<Vec<String>> {
        let mut keys = Vec::new();
        loop {
            self.skip_blank(false);
            match self.peek()? {
                b'"' | b'\'' => {
                    let start = self.i + 1;
                    self.string()?;
                    let raw = &self.b[start..self.i - 1];
                    keys.push(String::from_utf8_lossy(raw).into_owned());
                }
                _ => {
                    let start = self.i;
                    while self
                        .peek()
                        .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
                    {
                        self.i += 1;
                    }
                    if start == self.i {
                        return None;
                    }
                    keys.push(String::from_utf8_lossy(&self.b[start..self.i]).into_owned());
                }
            }
            self.skip_blank(false);
            if self.peek() == Some(b'.') {
                self.i += 1;
            } else {
                return Some(keys);
            }
        }
    }

    fn key_value(&mut self, base: &str) -> Scan<()> {
        let start = self.i;
        let keys = self.key()?;
        self.skip_blank(false);
        if self.peek() != Some(b'=') {
            return None;
        }
        self.i += 1;
        let mut path = base.to_string();
        for k in keys {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&k);
        }
        let at = self.entries.len();
        // Until the value is scanned, the entry extends to the end: an
        // error inside an unfinished value belongs to this key.
        self.entries.push((path.clone(), start, usize::MAX));
        self.value(&path)?;
        self.entries[at].2 = self.i;
        Some(())
    }

    fn value(&mut self, path: &str) -> Scan<()> {
        self.skip_blank(false);
        match self.peek()? {
            b'"' | b'\'' => self.string(),
            b'[' => {
                self.i += 1;
                let mut n = 0;
                loop {
                    self.skip_blank(true);
                    if self.peek()? == b']' {
                        self.i += 1;
                        return Some(());
                    }
                    let elem = format!("{path}[{n}]");
                    let at = self.entries.len();
                    self.entries.push((elem.clone(), self.i, usize::MAX));
                    self.value(&elem)?;
                    self.entries[at].2 = self.i;
                    self.skip_blank(true);
                    match self.peek()? {
                        b',' => {
                            self.i += 1;
                            n += 1;
                        }
                        b']' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b'{' => {
                self.i += 1;
                loop {
                    self.skip_blank(false);
                    if self.peek()? == b'}' {
                        self.i += 1;
                        return Some(());
                    }
                    self.key_value(path)?;
                    self.skip_blank(false);
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            _ => {
                let start = self.i;
                while self
                    .peek()
                    .is_some_and(|c| !matches!(c, b',' | b']' | b'}' | b'\n' | b'#'))
                {
                    self.i += 1;
                }
                (self.i > start).then_some(())
            }
        }
    }

    /// Skip a basic, literal or multi-line string.
    fn string(&mut self) -> Scan<()> {
        let q = self.peek()?;
        let triple = [q, q, q];
        if self.b[self.i..].starts_with(&triple) {
            self.i += 3;
            loop {
                if self.b[self.i..].starts_with(&triple) {
                    self.i += 3;
                    // Up to two more quotes may belong to the content.
                    while self.peek() == Some(q) {
                        self.i += 1;
                    }
                    return Some(());
                }
                if q == b'"' && self.peek()? == b'\\' {
                    self.i += 1;
                }
                self.peek()?;
                self.i += 1;
            }
        }
        self.i += 1;
        loop {
            match self.peek()? {
                b'\n' => return None,
                c if c == q => {
                    self.i += 1;
                    return Some(());
                }
                b'\\' if q == b'"' => self.i += 2,
                _ => self.i += 1,
            }
        }
    }
}
