//! A small RFC 4180 CSV reader for MMLU's files (pandas `to_csv` output): comma
//! separated, fields optionally quoted with `"`, `""` inside quotes is one quote, and quoted
//! fields may hold commas and newlines. Lines may end in `\n` or `\r\n`.

use crate::error::{bad, Result};
use std::path::Path;

/// One record and the 1-based line it starts on.
pub type Record = (usize, Vec<String>);

/// Parses CSV text; `what` names the file in errors.
pub fn parse(text: &str, what: &str) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        loop {
            // One field.
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        None => {
                            return Err(bad(format!(
                                "{what}:{start}: a quoted field is not closed"
                            )))
                        }
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                            }
                            field.push(c);
                        }
                    }
                }
                match chars.peek() {
                    None | Some(',') | Some('\n') | Some('\r') => {}
                    Some(_) => {
                        return Err(bad(format!(
                            "{what}:{line}: text after a closing quote (a quote inside a field must be doubled)"
                        )))
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '\n' || c == '\r' {
                        break;
                    }
                    if c == '"' {
                        return Err(bad(format!(
                            "{what}:{line}: a quote inside an unquoted field"
                        )));
                    }
                    field.push(c);
                    chars.next();
                }
            }
            fields.push(std::mem::take(&mut field));
            match chars.next() {
                Some(',') => continue,
                Some('\r') => {
                    if chars.peek() == Some(&'\n') {
                        chars.next();
                    }
                    line += 1;
                    break;
                }
                Some('\n') => {
                    line += 1;
                    break;
                }
                None => break,
                Some(_) => unreachable!("fields end at a separator"),
            }
        }
        // A blank line is one empty field: skip it, as pandas does.
        if !(fields.len() == 1 && fields[0].is_empty()) {
            out.push((start, fields));
        }
    }
    Ok(out)
}

/// Reads and parses a CSV file.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let bytes = std::fs::read(path).map_err(|e| crate::Error::read(path, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| bad(format!("{}: not valid UTF-8", path.display())))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    parse(text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Vec<Vec<String>> {
        parse(text, "t").unwrap().into_iter().map(|r| r.1).collect()
    }

    #[test]
    fn quotes_commas_and_newlines() {
        let got = fields("a,\"b, c\",\"say \"\"hi\"\"\"\n\"two\nlines\",,x\r\nlast,1");
        assert_eq!(
            got,
            vec![
                vec!["a", "b, c", "say \"hi\""],
                vec!["two\nlines", "", "x"],
                vec!["last", "1"],
            ]
        );
        let lines: Vec<usize> = parse("a\n\"b\nc\"\nd\n", "t")
            .unwrap()
            .iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(lines, vec![1, 2, 4]);
    }

    #[test]
    fn blank_lines_are_skipped_and_a_trailing_comma_is_an_empty_field() {
        assert_eq!(fields("a,b\n\nc,\n"), vec![vec!["a", "b"], vec!["c", ""]]);
    }

    #[test]
    fn malformed_quotes_are_bad_input() {
        for t in ["\"open", "\"a\"b,c", "a\"b"] {
            let e = parse(t, "f.csv").unwrap_err();
            assert!(
                e.is_bad_input() && e.to_string().starts_with("f.csv:1"),
                "{t}: {e}"
            );
        }
    }
}
