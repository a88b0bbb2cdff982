//! llama.cpp's GBNF grammars as llguidance's Lark: rules `name ::= ...` become `name: ...`
//! (`root` is `start`; names lowercased, `-` as `_`, behind an `r_` prefix so that none is a
//! Lark keyword), strings are rewritten as JSON strings, character classes and `.` become
//! regular expressions; alternation, grouping, `* + ?` and `{m,n}` read the same in both.
//! llguidance takes Lark only, and llama.cpp's grammars are GBNF.

/// The Lark grammar for a GBNF one, or why it cannot be read.
pub fn to_lark(gbnf: &str) -> Result<String, String> {
    let tokens = lex(gbnf)?;
    let mut out = String::new();
    let mut i = 0;
    let mut has_root = false;
    while i < tokens.len() {
        let Tok::Name(name) = &tokens[i] else { return Err(format!("expected a rule name, found {}", tokens[i].show())) };
        if tokens.get(i + 1) != Some(&Tok::Def) {
            return Err(format!("expected '::=' after the rule name '{name}'"));
        }
        has_root |= name == "root";
        out.push_str(&rule_name(name));
        out.push(':');
        i += 2;
        let start = i;
        // the body runs to the next `name ::=`
        while i < tokens.len() && !(matches!(tokens[i], Tok::Name(_)) && tokens.get(i + 1) == Some(&Tok::Def)) {
            out.push(' ');
            out.push_str(&match &tokens[i] {
                Tok::Name(n) => rule_name(n),
                Tok::Text(s) => serde_json::to_string(s).expect("a string serializes"),
                Tok::Class(c) => format!("/{}/", c.replace('/', "\\/")),
                Tok::Any => "/(?s:.)/".to_string(),
                Tok::Op(op) => op.clone(),
                Tok::Def => return Err("'::=' inside a rule body".into()),
            });
            i += 1;
        }
        if i == start {
            return Err(format!("the rule '{name}' is empty"));
        }
        out.push('\n');
    }
    if !has_root {
        return Err("the grammar has no 'root' rule".into());
    }
    Ok(out)
}

fn rule_name(name: &str) -> String {
    if name == "root" {
        "start".into()
    } else {
        format!("r_{}", name.to_ascii_lowercase().replace('-', "_"))
    }
}

#[derive(Debug, PartialEq)]
enum Tok {
    Name(String),
    Def,
    /// A string's characters, unescaped.
    Text(String),
    /// A character class, brackets included, as a regex reads it.
    Class(String),
    Any,
    /// `|`, `(`, `)`, `*`, `+`, `?` or a `{m,n}` repetition.
    Op(String),
}

impl Tok {
    fn show(&self) -> String {
        match self {
            Tok::Name(n) => format!("'{n}'"),
            Tok::Def => "'::='".into(),
            Tok::Text(s) => format!("{s:?}"),
            Tok::Class(c) => c.clone(),
            Tok::Any => "'.'".into(),
            Tok::Op(o) => format!("'{o}'"),
        }
    }
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            _ if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ':' if chars[i..].starts_with(&[':', ':', '=']) => {
                out.push(Tok::Def);
                i += 3;
            }
            '"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("a string is not closed".into()),
                        Some('"') => break,
                        Some('\\') => {
                            let (ch, used) = escape(&chars[i + 1..])?;
                            s.push(ch);
                            i += 1 + used;
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                i += 1;
                out.push(Tok::Text(s));
            }
            '[' => {
                let start = i;
                i += 1;
                while i < chars.len() && chars[i] != ']' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                if i >= chars.len() {
                    return Err("a character class is not closed".into());
                }
                i += 1;
                out.push(Tok::Class(chars[start..i].iter().collect()));
            }
            '.' => {
                out.push(Tok::Any);
                i += 1;
            }
            '|' | '(' | ')' | '*' | '+' | '?' => {
                out.push(Tok::Op(c.to_string()));
                i += 1;
            }
            '{' => {
                let end = chars[i..].iter().position(|&c| c == '}').ok_or("a '{m,n}' repetition is not closed")? + i;
                let inner: String = chars[i + 1..end].iter().filter(|c| !c.is_whitespace()).collect();
                if inner.is_empty() || !inner.chars().all(|c| c.is_ascii_digit() || c == ',') || inner.matches(',').count() > 1 || inner.starts_with(',') {
                    return Err(format!("'{{{inner}}}' is not a repetition"));
                }
                out.push(Tok::Op(format!("{{{inner}}}")));
                i = end + 1;
            }
            _ if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '-' || chars[i] == '_') {
                    i += 1;
                }
                out.push(Tok::Name(chars[start..i].iter().collect()));
            }
            '<' => return Err("token references (<...>) are not supported".into()),
            _ => return Err(format!("unexpected '{c}'")),
        }
    }
    Ok(out)
}

/// A string's escape after the backslash: the character and how many characters it took.
fn escape(rest: &[char]) -> Result<(char, usize), String> {
    let hex = |n: usize| -> Result<(char, usize), String> {
        let digits: String = rest.get(1..1 + n).ok_or("a short \\x / \\u escape")?.iter().collect();
        let v = u32::from_str_radix(&digits, 16).map_err(|_| format!("bad escape digits '{digits}'"))?;
        Ok((char::from_u32(v).ok_or(format!("\\u{digits} is not a character"))?, 1 + n))
    };
    match rest.first() {
        Some('n') => Ok(('\n', 1)),
        Some('t') => Ok(('\t', 1)),
        Some('r') => Ok(('\r', 1)),
        Some('x') => hex(2),
        Some('u') => hex(4),
        Some('U') => hex(8),
        Some(&c) => Ok((c, 1)),
        None => Err("a string ends in a backslash".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_literals_classes_and_repetitions() {
        let g = to_lark("# answer\nroot ::= answer (\" \" num){0,2}\nanswer ::= \"yes\" | \"no\\n\"\nnum ::= [0-9]+ \".\"? .\n").unwrap();
        assert_eq!(g, "start: r_answer ( \" \" r_num ) {0,2}\nr_answer: \"yes\" | \"no\\n\"\nr_num: /[0-9]/ + \".\" ? /(?s:.)/\n");
        assert_eq!(to_lark("root ::= [a/b]").unwrap(), "start: /[a\\/b]/\n");
        assert_eq!(to_lark("root ::= my-Rule\nmy-Rule ::= \"\\x41\\u00e9\"").unwrap(), "start: r_my_rule\nr_my_rule: \"Aé\"\n");
    }

    #[test]
    fn bad_grammars_say_why() {
        for (g, why) in [
            ("answer ::= \"x\"", "root"),
            ("root ::= \"x", "not closed"),
            ("root ::= [a", "not closed"),
            ("root ::= x{a}", "repetition"),
            ("root ::= <[123]>", "token"),
            ("root x", "::="),
            ("root ::=", "empty"),
        ] {
            let e = to_lark(g).unwrap_err();
            assert!(e.contains(why), "{g}: {e}");
        }
    }
}
