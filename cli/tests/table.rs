//! The table formatter through the public API.

use ferro_cli::table::Table;

#[test]
fn columns_align_and_lines_have_no_trailing_spaces() {
    let mut t = Table::new(["INSTANCE", "STATE", "HOST"]);
    t.row(["i-0000000000000001", "running", "aio-host-1"]);
    t.row(["i-2", "shutting-down", ""]);
    let out = t.render();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0], "INSTANCE            STATE          HOST");
    assert_eq!(lines[1], "i-0000000000000001  running        aio-host-1");
    assert_eq!(lines[2], "i-2                 shutting-down");
    // Every column starts at the same offset on every line.
    let col = lines[0].find("STATE").unwrap();
    assert_eq!(lines[1].find("running"), Some(col));
    assert_eq!(lines[2].find("shutting-down"), Some(col));
}

#[test]
fn header_only_table() {
    assert_eq!(Table::new(["A", "BB"]).to_string(), "A  BB\n");
}

#[test]
fn wide_unicode_cells_count_as_characters() {
    let mut t = Table::new(["K", "V"]);
    t.row(["zoné", "1"]);
    assert_eq!(t.render(), "K     V\nzoné  1\n");
}
