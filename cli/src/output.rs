//! Printing: aligned tables for people, one JSON document for scripts. A
//! closed stdout (`vol list | head -1`) is not an error.

use std::io::{self, Write};

use serde::Serialize;

pub struct Out {
    pub json: bool,
}

impl Out {
    pub fn json<T: Serialize>(&self, value: &T) -> io::Result<()> {
        let mut s = serde_json::to_string_pretty(value).map_err(io::Error::other)?;
        s.push('\n');
        write_stdout(&s)
    }

    /// One JSON document on one line, for shapes other tools print so.
    pub fn compact_json<T: Serialize>(&self, value: &T) -> io::Result<()> {
        let mut s = serde_json::to_string(value).map_err(io::Error::other)?;
        s.push('\n');
        write_stdout(&s)
    }

    pub fn line(&self, s: impl AsRef<str>) -> io::Result<()> {
        write_stdout(&format!("{}\n", s.as_ref()))
    }

    /// A table with a header row; columns are as wide as their widest cell.
    pub fn table(&self, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for row in rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut s = String::new();
        let mut push_row = |cells: &mut dyn Iterator<Item = &str>| {
            let line: Vec<String> = cells
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            s.push_str(line.join("  ").trim_end());
            s.push('\n');
        };
        push_row(&mut header.iter().copied());
        for row in rows {
            push_row(&mut row.iter().map(String::as_str));
        }
        write_stdout(&s)
    }

    /// `key: value` lines, keys aligned.
    pub fn fields(&self, fields: &[(&str, String)]) -> io::Result<()> {
        let w = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
        let s: String = fields
            .iter()
            .map(|(k, v)| format!("{:<w$} {v}\n", format!("{k}:")))
            .collect();
        write_stdout(&s)
    }
}

fn write_stdout(s: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}
