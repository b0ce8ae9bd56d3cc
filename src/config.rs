//! `--config FILE`: every flag of `lead`, `follow` and `node` may also come from a TOML file.
//! Flags win over `FERRY_*` environment variables, which win over the file; a key the file has
//! that no subcommand knows is an error naming the key and its line.
//!
//! The file is read before clap parses anything, and each setting not given as a flag or
//! through the environment is appended to the command line as `--key value`; clap then parses
//! as usual, so one set of rules (types, ranges, help) covers all three sources. The TOML subset
//! read is what a flat config needs: `key = "string" | integer | true | false`, comments, and
//! `[lead]` / `[follow]` / `[node]` sections for settings of one subcommand only. A subcommand
//! that acts on what another runs (`handoff` and `cluster` on a node's cluster) borrows that
//! one's section: of it, and of the keys outside any section, the keys it knows itself.

use std::ffi::OsString;

use anyhow::{anyhow, bail, Context};

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

struct Entry {
    section: Option<String>,
    key: String,
    value: Value,
    line: usize,
}

fn parse_value(raw: &str, line: usize) -> anyhow::Result<Value> {
    let raw = raw.trim();
    if let Some(body) = raw.strip_prefix('"') {
        let body = body
            .strip_suffix('"')
            .ok_or_else(|| anyhow!("line {line}: unterminated string"))?;
        let mut out = String::new();
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    other => bail!(
                        "line {line}: unsupported escape \\{}",
                        other.map_or(String::new(), String::from)
                    ),
                }
            } else if c == '"' {
                bail!("line {line}: stray quote in a string");
            } else {
                out.push(c);
            }
        }
        return Ok(Value::Str(out));
    }
    match raw {
        "true" => Ok(Value::Bool(true)),
        "false" => Ok(Value::Bool(false)),
        _ => raw
            .replace('_', "")
            .parse::<i64>()
            .map(Value::Int)
            .map_err(|_| anyhow!("line {line}: {raw:?} is not a string, integer or boolean")),
    }
}

/// The line up to a `#` that is not inside a string.
fn strip_comment(line: &str) -> &str {
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            '\\' if in_string && !escaped => {
                escaped = true;
                continue;
            }
            '"' if !escaped => in_string = !in_string,
            '#' if !in_string => return &line[..i],
            _ => {}
        }
        escaped = false;
    }
    line
}

fn parse(text: &str) -> anyhow::Result<Vec<Entry>> {
    let mut section = None;
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = strip_comment(line).trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim().to_string());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| anyhow!("line {line_no}: expected `key = value`"))?;
        entries.push(Entry {
            section: section.clone(),
            key: key.trim().replace('_', "-"),
            value: parse_value(value, line_no)?,
            line: line_no,
        });
    }
    Ok(entries)
}

/// The config file named by `--config FILE` (or `--config=FILE`) in `args`, or `FERRY_CONFIG`.
fn config_path(args: &[OsString]) -> Option<OsString> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(v.into());
        }
    }
    std::env::var_os("FERRY_CONFIG")
}

/// `args` with the config file's settings appended where no flag or variable gives them.
/// `subcommands` name the file's sections; `borrowers` pairs each other subcommand that reads
/// the file with the section it reads. `known(sub)` lists the long flag names of a subcommand.
pub fn apply(
    args: Vec<OsString>,
    subcommands: &[&str],
    borrowers: &[(&str, &str)],
    known: impl Fn(&str) -> Vec<String>,
) -> anyhow::Result<Vec<OsString>> {
    let Some(path) = config_path(&args) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.to_string_lossy()))?;
    let entries = parse(&text).with_context(|| format!("in {}", path.to_string_lossy()))?;
    let section_of = |a: &str| {
        subcommands
            .iter()
            .find(|s| **s == a)
            .or_else(|| borrowers.iter().find(|(b, _)| *b == a).map(|(_, s)| s))
            .map(|s| s.to_string())
    };
    let sub = args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find_map(|a| Some((a.to_string(), section_of(a)?)));
    let mut out = args.clone();
    for e in entries {
        let where_ = format!("{}, line {}", path.to_string_lossy(), e.line);
        if e.key == "config" {
            bail!("{where_}: `config` cannot be set from a config file");
        }
        let applies_to: Vec<&str> = match &e.section {
            Some(s) if subcommands.contains(&s.as_str()) => vec![s.as_str()],
            Some(s) => bail!(
                "{where_}: unknown section [{s}] (known: {})",
                subcommands.join(", ")
            ),
            None => subcommands.to_vec(),
        };
        let valid_somewhere = applies_to.iter().any(|s| known(s).contains(&e.key));
        if !valid_somewhere {
            bail!("{where_}: unknown key `{}`", e.key);
        }
        let Some((sub, section)) = &sub else {
            continue;
        };
        if !applies_to.contains(&section.as_str()) || !known(sub).contains(&e.key) {
            continue;
        }
        let flag = format!("--{}", e.key);
        let given = args.iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a == flag || a.starts_with(&format!("{flag}=")))
        });
        let env_name = format!("FERRY_{}", e.key.to_uppercase().replace('-', "_"));
        if given || std::env::var_os(&env_name).is_some() {
            continue;
        }
        match e.value {
            Value::Bool(true) => out.push(flag.into()),
            Value::Bool(false) => {}
            Value::Int(i) => {
                out.push(flag.into());
                out.push(i.to_string().into());
            }
            Value::Str(s) => {
                out.push(flag.into());
                out.push(s.into());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(sub: &str) -> Vec<String> {
        match sub {
            "lead" => vec!["data-dir".into(), "listen".into(), "http".into()],
            "follow" => vec!["data-dir".into(), "leader".into(), "once".into()],
            "peek" => vec!["leader".into(), "json".into()],
            _ => vec![],
        }
    }

    fn run(args: &[&str], file: &str) -> anyhow::Result<Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        argv.push("--config".into());
        argv.push(path.into());
        Ok(
            apply(argv, &["lead", "follow"], &[("peek", "follow")], known)?
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
        )
    }

    #[test]
    fn file_settings_fill_in_what_flags_do_not_give() {
        let out = run(
            &["ferry", "follow", "--leader", "flag:1"],
            "data_dir = \"/d\" # comment\nleader = \"file:2\"\nonce = true\n[lead]\nlisten = \"x\"\n",
        )
        .unwrap();
        let tail = &out[6..];
        assert_eq!(tail, ["--data-dir", "/d", "--once"], "{out:?}");
    }

    #[test]
    fn a_borrower_takes_what_it_knows_of_its_lenders_section_and_no_other() {
        let file = "data_dir = \"/d\"\n[follow]\nleader = \"follow:2\"\nonce = true\n\
                    [lead]\nlisten = \"x\"\n";
        let out = run(&["ferry", "peek", "status"], file).unwrap();
        assert_eq!(out[5..], ["--leader", "follow:2"], "{out:?}");
        let out = run(&["ferry", "peek"], "leader = \"top:1\"\n").unwrap();
        assert_eq!(out[4..], ["--leader", "top:1"], "{out:?}");
    }

    #[test]
    fn unknown_keys_and_sections_are_errors_naming_them() {
        let e = run(&["ferry", "lead"], "data-dir = \"/d\"\nlisten_port = 7\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("line 2: unknown key `listen-port`"),
            "{e:#}"
        );
        let e = run(&["ferry", "lead"], "[nodes]\nx = 1\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("unknown section [nodes]"),
            "{e:#}"
        );
        let e = run(&["ferry", "lead"], "listen = [1, 2]\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
    }
}
