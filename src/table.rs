//! Reading the merged table (`fad convert`'s output) from a file, stdin or a data
//! directory, one row at a time; errors name the input, line and field.

use crate::cli::Join;
use crate::engine::{parse_timestamp, parse_value};
use anyhow::{Context, Result, anyhow};
use std::fmt;
use std::io::Read;
use std::path::Path;

/// One row, borrowing from the reader's record.
#[derive(Debug)]
pub struct TableRow<'r> {
    pub timestamp: &'r str,
    pub time: f64,
    pub group_id: &'r str,
    pub sequence_id: &'r str,
    pub bpm_text: &'r str,
    pub bpm: f64,
    pub uterus_text: &'r str,
    pub uterus: f64,
    pub target: Option<&'r str>,
}

/// A row that could not be read; `Display` names input, line and field.
#[derive(Debug)]
pub struct RowError {
    pub input: String,
    pub line: u64,
    pub field: String,
    pub problem: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{} line {}: {}", self.input, self.line, self.problem)
        } else {
            write!(f, "{} line {}, field {}: {}", self.input, self.line, self.field, self.problem)
        }
    }
}

impl std::error::Error for RowError {}

/// Spaces around a field: ASCII white space and Unicode spaces (no-break space and the
/// like), but not a control character such as NEL (U+0085), which `str::trim` takes for
/// white space: trimmed, `g<NEL>` would silently become series `g`; kept, it is refused.
pub fn trim_padding(field: &str) -> &str {
    field.trim_matches(|c: char| c.is_ascii_whitespace() || (c.is_whitespace() && !c.is_control()))
}

/// `trim` of an ASCII field, skipped when it neither starts nor ends with a space.
trait TrimAsciiFast {
    fn trim_ascii_fast(&self) -> &str;
}

impl TrimAsciiFast for str {
    #[inline]
    fn trim_ascii_fast(&self) -> &str {
        match (self.as_bytes().first(), self.as_bytes().last()) {
            (Some(&a), Some(&b)) if a.is_ascii_graphic() && b.is_ascii_graphic() => self,
            _ => trim_padding(self),
        }
    }
}

/// Longest line accepted in a table: a file without newlines must not exhaust memory.
pub const MAX_TABLE_LINE: usize = 1 << 20;

/// Passes bytes through, failing once a line grows past [`MAX_TABLE_LINE`], and keeps
/// where the recent CRLF line ends were: the csv crate places a record that follows one
/// on the LF before it, a line short (BurntSushi/rust-csv#395).
struct LineLimit<R> {
    inner: R,
    line: u64,
    /// Bytes since the last newline.
    run: usize,
    /// Bytes passed on before the current read.
    offset: u64,
    /// Whether the last byte passed on was a CR.
    after_cr: bool,
    /// Offsets of the LFs of the last [`CRLF_KEPT`] CRLFs.
    crlf: std::collections::VecDeque<u64>,
}

/// CRLFs kept: far more than the csv reader reads ahead of its record.
const CRLF_KEPT: usize = 1 << 16;

impl<R> LineLimit<R> {
    fn new(inner: R) -> Self {
        LineLimit { inner, line: 1, run: 0, offset: 0, after_cr: false, crlf: Default::default() }
    }

    /// The line of a record that csv says starts at byte `at` on line `csv_line`.
    fn line_at(&self, at: u64, csv_line: u64) -> u64 {
        csv_line + self.crlf.binary_search(&at).is_ok() as u64
    }
}

impl<R: Read> Read for LineLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let data = &buf[..n];
        // The longest run without a newline: before the first one (continuing the current
        // line), between two of them, or after the last one.
        let mut start = 0;
        let mut longest = 0;
        let mut first = true;
        for nl in memchr::memchr_iter(b'\n', data) {
            let run = if first { self.run + nl } else { nl - start };
            if run > longest {
                longest = run;
            }
            if run > MAX_TABLE_LINE {
                break;
            }
            first = false;
            self.line += 1;
            start = nl + 1;
            let cr = if nl == 0 { self.after_cr } else { data[nl - 1] == b'\r' };
            if cr {
                if self.crlf.len() == CRLF_KEPT {
                    self.crlf.pop_front();
                }
                self.crlf.push_back(self.offset + nl as u64);
            }
        }
        self.offset += n as u64;
        self.after_cr = data.last().map_or(self.after_cr, |&b| b == b'\r');
        if longest <= MAX_TABLE_LINE {
            let tail = if first { self.run + n } else { n - start };
            longest = tail;
            self.run = tail;
        }
        if longest > MAX_TABLE_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line {} is longer than {} bytes", self.line, MAX_TABLE_LINE),
            ));
        }
        Ok(n)
    }
}

/// The csv reader's buffer: large reads (its default is 8 KiB).
const TABLE_BUFFER: usize = 1 << 16;

const REQUIRED: [&str; 5] = ["timestamp", "group_id", "sequence_id", "bpm", "uterus"];

/// Display name of an input path (`-` is stdin).
pub fn input_name(path: &Path) -> String {
    if path.as_os_str() == "-" { "<stdin>".to_string() } else { path.display().to_string() }
}

/// Opens `path` as a merged table: `-` is stdin, a directory is converted in memory (its
/// warnings and `--skip-bad` those of `fad <command>`).
pub fn open(path: &Path, join: Join, skip_bad: bool, command: &str) -> Result<Box<dyn Read>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(std::io::stdin()));
    }
    if path.is_dir() {
        let mut buf = Vec::new();
        crate::cmd::convert::write_table(path, join, skip_bad, command, &mut buf)?;
        return Ok(Box::new(std::io::Cursor::new(buf)));
    }
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // No BufReader: the csv reader buffers (TABLE_BUFFER), and a second buffer is a copy.
    Ok(Box::new(f))
}

/// Calls `f` with every row (or its error) in order. A missing column or unreadable input
/// is an error for the whole table.
pub fn for_each_row(
    input: impl Read,
    name: &str,
    mut f: impl FnMut(std::result::Result<TableRow, RowError>) -> Result<()>,
) -> Result<()> {
    let input = LineLimit::new(input);
    let mut rdr =
        csv::ReaderBuilder::new().has_headers(true).flexible(true).buffer_capacity(TABLE_BUFFER).from_reader(input);
    let headers = rdr.byte_headers().with_context(|| format!("cannot read the header of {name}"))?.clone();
    if headers.is_empty() {
        return Err(anyhow!("{name} is empty: expected a header {}", REQUIRED.join(",")));
    }
    let header_names: Vec<String> =
        headers.iter().map(|h| String::from_utf8_lossy(h).trim().trim_start_matches('\u{feff}').to_string()).collect();
    let col = |n: &str| header_names.iter().position(|h| h == n);
    let mut idx = [0usize; 5];
    for (i, name_) in REQUIRED.iter().enumerate() {
        idx[i] = col(name_)
            .ok_or_else(|| anyhow!("{name} line 1: no column {name_:?} in the header (need {})", REQUIRED.join(",")))?;
    }
    let target_col = col("target");
    let mut record = csv::ByteRecord::new();
    // The ids of the last row that passed the id checks.
    let mut last_ids = (String::new(), String::new());
    // Each series' target and the line it was first seen at; the ids and target of the
    // last row whose target was checked.
    let mut targets: std::collections::HashMap<(String, String), (String, u64)> = Default::default();
    let mut last_target = (String::new(), String::new(), String::new());
    loop {
        let more = match rdr.read_byte_record(&mut record) {
            Ok(m) => m,
            Err(e) => {
                let line = e.position().map_or(0, |p| rdr.get_ref().line_at(p.byte(), p.line()));
                let err = RowError {
                    input: name.to_owned(),
                    line,
                    field: String::new(),
                    problem: format!("unreadable CSV ({e})"),
                };
                if let csv::ErrorKind::Io(_) = e.kind() {
                    return Err(anyhow!(e).context(format!("cannot read {name}")));
                }
                f(Err(err))?;
                continue;
            }
        };
        if !more {
            break;
        }
        // Worked out only for a message: most rows need no line number.
        let line = || record.position().map_or(0, |p| rdr.get_ref().line_at(p.byte(), p.line()));
        let bad = |field: &str, problem: String| RowError {
            input: name.to_owned(),
            line: line(),
            field: field.to_owned(),
            problem,
        };
        if record.len() != header_names.len() {
            f(Err(bad("", format!("expected {} fields, found {}", header_names.len(), record.len()))))?;
            continue;
        }
        // The fields of a usual table fit on the stack: no allocation per row.
        let mut small = [""; 16];
        let mut large = Vec::new();
        let fields: &mut [&str] = if record.len() <= small.len() {
            &mut small[..record.len()]
        } else {
            large.resize(record.len(), "");
            &mut large
        };
        let mut utf8_error = None;
        for (i, b) in record.iter().enumerate() {
            let text = if b.is_ascii() {
                // SAFETY: ASCII is UTF-8.
                Ok(unsafe { std::str::from_utf8_unchecked(b) })
            } else {
                std::str::from_utf8(b)
            };
            match text {
                // A BOM where files were concatenated is no part of the value (as in `stream`).
                Ok(s) if b.is_ascii() => fields[i] = s.trim_ascii_fast(),
                Ok(s) => fields[i] = trim_padding(trim_padding(s).trim_start_matches('\u{feff}')),
                Err(_) => utf8_error = Some(i),
            }
        }
        if let Some(i) = utf8_error {
            f(Err(bad(&header_names[i], "not UTF-8 text".into())))?;
            continue;
        }
        let [ti, gi, si, bi, ui] = idx;
        let Some(time) = parse_timestamp(fields[ti]) else {
            f(Err(bad("timestamp", format!("{:?} is not a time (seconds or ISO 8601)", fields[ti]))))?;
            continue;
        };
        let Some(bpm) = parse_value(fields[bi]) else {
            f(Err(bad("bpm", format!("{:?} is not a number", fields[bi]))))?;
            continue;
        };
        let Some(uterus) = parse_value(fields[ui]) else {
            f(Err(bad("uterus", format!("{:?} is not a number", fields[ui]))))?;
            continue;
        };
        if fields[gi].is_empty() || fields[si].is_empty() {
            let which = if fields[gi].is_empty() { "group_id" } else { "sequence_id" };
            f(Err(bad(which, "empty".into())))?;
            continue;
        }
        // Rows of one series follow each other: ids checked on the row before need no
        // second look (the scans were a twentieth of `fad score`'s time).
        let checked = fields[gi] == last_ids.0 && fields[si] == last_ids.1;
        if !checked
            && let Some((which, why)) = [(gi, "group_id"), (si, "sequence_id")].into_iter().find_map(|(i, name)| {
                let id = fields[i];
                let why = match bad_id(id) {
                    Some(bad) => Some(format!("{} ({})", bad.describe(), bad.reason())),
                    None => csv_breaking(id).map(|why| format!("{id:?} {why}")),
                };
                why.map(|why| (name, why))
            })
        {
            f(Err(bad(which, why)))?;
            continue;
        }
        if !checked {
            last_ids.0.clear();
            last_ids.0.push_str(fields[gi]);
            last_ids.1.clear();
            last_ids.1.push_str(fields[si]);
        }
        let target = target_col.map(|c| fields[c]).filter(|t| !t.is_empty());
        // Two patients under the same ids would be read as one series, their samples
        // mixed: the prototype's failure with folder names that repeat across classes.
        // The last row whose target was checked is remembered apart from `last_ids`
        // (a refused row or one without a target moves those, not this).
        if let Some(t) = target
            && !(fields[gi] == last_target.0 && fields[si] == last_target.1 && t == last_target.2)
        {
            let key = (fields[gi].to_owned(), fields[si].to_owned());
            match targets.get(&key) {
                Some((first, at)) if first != t => {
                    let why = format!(
                        "{t:?}, but group_id {:?} sequence_id {:?} was {first:?} at line {at}: two patients \
                         share these ids (fad convert names groups <class>-<folder> for this reason)",
                        fields[gi], fields[si]
                    );
                    f(Err(bad("target", why)))?;
                    continue;
                }
                Some(_) => {}
                None => {
                    targets.insert(key, (t.to_owned(), line()));
                }
            }
            for (kept, now) in
                [(&mut last_target.0, fields[gi]), (&mut last_target.1, fields[si]), (&mut last_target.2, t)]
            {
                kept.clear();
                kept.push_str(now);
            }
        }
        f(Ok(TableRow {
            timestamp: fields[ti],
            time,
            group_id: fields[gi],
            sequence_id: fields[si],
            bpm_text: fields[bi],
            bpm,
            uterus_text: fields[ui],
            uterus,
            target,
        }))?;
    }
    Ok(())
}

/// Longest group or sequence id; longer ones are rejected (`id_too_long`) so that a feed
/// cannot make one series cost more than a little memory.
pub const MAX_ID: usize = 256;

/// Why a group or sequence id cannot be used: `fad stream` replies with an error, the
/// table reader (`score`, `train`) names the row, and `fad convert` refuses such ids when
/// it makes them from folder and file names. Ordered: where both ids are bad, the greater
/// problem is the one reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BadId {
    /// A control character would be echoed into replies (a terminal escape, a stray CR
    /// splitting a reply for a line-based consumer).
    ControlChar,
    /// Longer than [`MAX_ID`] bytes.
    TooLong,
}

impl BadId {
    /// What is wrong, for a message naming the file and line.
    pub fn describe(self) -> String {
        match self {
            BadId::ControlChar => "has a control character".into(),
            BadId::TooLong => format!("is longer than {MAX_ID} bytes"),
        }
    }

    /// The error reason of a stream reply.
    pub fn reason(self) -> &'static str {
        match self {
            BadId::ControlChar => "control_char_in_id",
            BadId::TooLong => "id_too_long",
        }
    }
}

/// A comma or double quote in an id: fad writes ids into CSV fields unquoted (score's
/// rows, convert's table and feed), where it would split or open a field.
pub fn csv_breaking(id: &str) -> Option<&'static str> {
    if id.contains(',') {
        Some("has a comma, which would split its CSV field")
    } else if id.contains('"') {
        Some("has a double quote, which would break its CSV field")
    } else {
        None
    }
}

/// Checks a group or sequence id (a comma cannot occur: it ends the field).
pub fn bad_id(id: &str) -> Option<BadId> {
    if id.len() > MAX_ID {
        return Some(BadId::TooLong);
    }
    // Byte by byte when the id is ASCII (the usual case): a stream checks two ids a line.
    let control =
        if id.is_ascii() { id.bytes().any(|b| b.is_ascii_control()) } else { id.chars().any(char::is_control) };
    control.then_some(BadId::ControlChar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_after_a_crlf_is_put_back_on_its_own_line() {
        let mut r = LineLimit::new(&b"ab\r\ncd\n\r\nef\r"[..]);
        let mut buf = [0u8; 3];
        while r.read(&mut buf).unwrap() > 0 {}
        assert_eq!(Vec::from(r.crlf.clone()), [3, 8], "the LFs of the two CRLFs, across reads");
        assert_eq!(r.line_at(3, 1), 2, "csv places line 2 on the LF at 3, as line 1");
        assert_eq!(r.line_at(5, 2), 2, "an LF line end needs nothing");
        assert_eq!(r.line_at(8, 3), 4);
    }
}
