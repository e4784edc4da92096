//! A tiny aligned-table formatter for human output.
//!
//! Columns are left-aligned and separated by two spaces; widths are counted
//! in characters. Lines carry no trailing spaces, and a table without rows
//! still prints its header.

/// An aligned text table: a header row and data rows.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new<I, S>(headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row. Missing cells print empty; extra cells are kept and
    /// widen the table.
    pub fn row<I, S>(&mut self, cells: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
        self
    }

    /// Number of data rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when there are no data rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let widths = self.widths();
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            render_line(&mut out, row, &widths);
        }
        out
    }

    fn widths(&self) -> Vec<usize> {
        let cols = std::iter::once(&self.headers)
            .chain(&self.rows)
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; cols];
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(display_width(cell));
            }
        }
        widths
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

/// Width of a cell: its characters (cells are cleaned of control
/// characters first, see [`clean`]).
fn display_width(s: &str) -> usize {
    s.chars().count()
}

/// Replaces control characters (tabs, newlines) so they cannot break the
/// alignment.
fn clean(cell: &str) -> String {
    cell.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn render_line(out: &mut String, row: &[String], widths: &[usize]) {
    let mut line = String::new();
    for (i, w) in widths.iter().enumerate() {
        let cell = row.get(i).map(|c| clean(c)).unwrap_or_default();
        if i > 0 {
            line.push_str("  ");
        }
        let pad = w.saturating_sub(display_width(&cell));
        line.push_str(&cell);
        line.extend(std::iter::repeat_n(' ', pad));
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_to_the_widest_cell() {
        let mut t = Table::new(["ID", "STATE", "HOST"]);
        t.row(["i-1", "running", "host-a"]);
        t.row(["i-0123456", "stopped", "b"]);
        assert_eq!(
            t.render(),
            "ID         STATE    HOST\n\
             i-1        running  host-a\n\
             i-0123456  stopped  b\n"
        );
    }

    #[test]
    fn empty_table_prints_its_header() {
        let t = Table::new(["NAME", "VCPUS"]);
        assert!(t.is_empty());
        assert_eq!(t.render(), "NAME  VCPUS\n");
    }

    #[test]
    fn no_trailing_spaces_and_missing_cells_are_blank() {
        let mut t = Table::new(["A", "B", "C"]);
        t.row(["x"]);
        t.row(["long", "", "z"]);
        let out = t.render();
        assert!(out.lines().all(|l| !l.ends_with(' ')), "{out:?}");
        assert_eq!(out, "A     B  C\nx\nlong     z\n");
    }

    #[test]
    fn widths_count_characters_not_bytes() {
        let mut t = Table::new(["N", "V"]);
        t.row(["größe", "1"]);
        t.row(["ab", "2"]);
        assert_eq!(t.render(), "N      V\ngröße  1\nab     2\n");
    }

    #[test]
    fn control_characters_do_not_break_lines() {
        let mut t = Table::new(["K", "V"]);
        t.row(["a\nb", "c\td"]);
        assert_eq!(t.render(), "K    V\na b  c d\n");
        assert_eq!(t.len(), 1);
    }
}
