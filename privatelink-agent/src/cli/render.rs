//! How answers are shown: tables that read like a console's lists (the id, name and state first,
//! times in RFC 3339 UTC last, nested values summarised, fitted to the terminal), CSV with the
//! same columns and cells, and JSON as the server sent it (with `--fields`, each object's keys in
//! the order asked).
use std::io::Write;

use serde::ser::{SerializeMap, SerializeSeq};
use serde_json::{Map, Value};

use super::Output;

/// How to show one answer.
pub struct View<'a> {
    pub output: Output,
    /// `--fields`, comma-separated: exactly these columns, in this order.
    pub fields: Option<&'a str>,
    /// The columns of an empty list (its header is still shown).
    pub empty: &'a [&'a str],
    /// Columns a table may take (the terminal's width); `None`: as wide as the cells.
    pub width: Option<u16>,
}

/// Columns first, in this order, when present; the rest follow alphabetically, times last.
const LEAD: &[&str] = &[
    "id",
    "node",
    "endpoint_id",
    "account_id",
    "seq",
    "time",
    "name",
    "state",
    "status",
    "ok",
    "error",
    "role",
    "event",
    "service_type",
    "service_name",
    "service_id",
    "ip",
    "ipv6",
    "ip_address_type",
    "dns_name",
    "cidr",
    "ipv6_cidr",
    "cidrs",
    "network_id",
    "subnet_id",
    "owner",
    "port_mappings",
    "backends",
    "security_groups",
    "rules",
    "auto_accept",
    "proxy_protocol",
    "private_dns_name",
    "private_dns_enabled",
    "revision",
    "lag",
    "last_contact",
    "ha",
    "api",
    "link_id",
    "description",
    "tags",
];

fn rank(c: &str) -> (usize, bool, String) {
    let is_time = c.ends_with("_time") || c.ends_with("_at");
    (
        LEAD.iter().position(|l| *l == c).unwrap_or(LEAD.len()),
        is_time,
        c.to_string(),
    )
}

/// Rows of a JSON reply: a list's items, a bare array, or one object.
pub fn rows(v: &Value) -> Vec<&Map<String, Value>> {
    let list = ROW_KEYS.iter().find_map(|k| v.get(*k)).unwrap_or(v);
    match list {
        Value::Array(a) => a.iter().filter_map(Value::as_object).collect(),
        Value::Object(o) => vec![o],
        _ => Vec::new(),
    }
}

/// RFC 3339 (UTC, seconds) of Unix seconds.
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// A value as one line of text: nested values summarised, never raw JSON.
pub fn cell(key: &str, v: &Value) -> String {
    let s = |v: &Value, k: &str| v.get(k).map(|x| cell(k, x)).unwrap_or_default();
    match v {
        Value::Null => String::new(),
        Value::String(x) => x.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) if key == "ts" => n.as_u64().map(rfc3339).unwrap_or_default(),
        Value::Number(n) => n.to_string(),
        Value::Array(items) => {
            let parts: Vec<String> = match key {
                "port_mappings" => items
                    .iter()
                    .map(|m| {
                        format!(
                            "{} {}→{}",
                            s(m, "protocol"),
                            s(m, "terminal_port"),
                            s(m, "service_port")
                        )
                    })
                    .collect(),
                "security_groups" => {
                    let mut b: Vec<(u64, String)> = items
                        .iter()
                        .map(|b| {
                            (
                                b["priority"].as_u64().unwrap_or(0),
                                s(b, "security_group_id"),
                            )
                        })
                        .collect();
                    b.sort();
                    b.into_iter().map(|(p, g)| format!("{p}:{g}")).collect()
                }
                "rules" => items
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {} from {} {}",
                            s(r, "protocol"),
                            s(r, "ports"),
                            s(r, "source"),
                            s(r, "action")
                        )
                    })
                    .collect(),
                "tags" => items
                    .iter()
                    .map(|t| format!("{}={}", s(t, "key"), s(t, "value")))
                    .collect(),
                "allowlist" => items.iter().map(|a| s(a, "account_id")).collect(),
                _ => items
                    .iter()
                    .map(|x| match x {
                        Value::Object(o) if o.contains_key("id") => cell("id", &o["id"]),
                        other => cell("", other),
                    })
                    .collect(),
            };
            parts.join(if key == "rules" { "; " } else { ", " })
        }
        Value::Object(o) => match key {
            "health_check" if o.get("enabled") == Some(&Value::Bool(true)) => {
                format!("every {}s", s(v, "interval_secs"))
            }
            "health_check" => "off".into(),
            "ha" => {
                let active = o.get("active") == Some(&Value::Bool(true));
                // With an owner per network: the networks it is active for.
                let networks: Vec<&str> = o
                    .get("networks")
                    .and_then(Value::as_array)
                    .map(|n| n.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                match (active, networks.is_empty()) {
                    (true, false) => format!("{} active ({})", s(v, "group"), networks.join(" ")),
                    (true, true) => format!("{} active", s(v, "group")),
                    (false, _) => format!("{} standby", s(v, "group")),
                }
            }
            _ => o
                .iter()
                .filter(|(k, _)| !k.ends_with("_at") || !o.contains_key(&time_of(k)))
                .map(|(k, x)| format!("{k}={}", cell(k, x)))
                .collect::<Vec<_>>()
                .join(", "),
        },
    }
}

fn time_of(at: &str) -> String {
    format!("{}_time", at.trim_end_matches("_at"))
}

/// The columns to show: `--fields` as given, else every key of every row (Unix-second `<x>_at`
/// left out where its RFC 3339 `<x>_time` is there; `ts` shown as `time`) in the console's order,
/// or the list's own columns when it is empty.
fn columns(rows: &[&Map<String, Value>], view: &View) -> Vec<String> {
    if let Some(f) = view.fields {
        return f
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
    }
    if rows.is_empty() {
        return view.empty.iter().map(|s| s.to_string()).collect();
    }
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        for k in r.keys() {
            let shown = if k == "ts" {
                "time".to_string()
            } else {
                k.clone()
            };
            let hidden = k.ends_with("_at") && r.contains_key(&time_of(k));
            if !hidden && !cols.contains(&shown) {
                cols.push(shown);
            }
        }
    }
    cols.sort_by_key(|c| rank(c));
    cols
}

fn value<'a>(r: &'a Map<String, Value>, col: &str) -> (&'a Value, &'a str) {
    match (col, r.get(col)) {
        ("time", None) => (r.get("ts").unwrap_or(&Value::Null), "ts"),
        (_, v) => (v.unwrap_or(&Value::Null), ""),
    }
}

fn text(r: &Map<String, Value>, col: &str) -> String {
    let (v, as_key) = value(r, col);
    cell(if as_key.is_empty() { col } else { as_key }, v)
}

/// A borderless table: upper-case headers, columns two spaces apart, widths by display width
/// (CJK characters take two columns), fitted to `width` (cells wrap) or at most 60 wide a column.
pub fn table(cols: &[String], rows: &[&Map<String, Value>], width: Option<u16>) -> String {
    use comfy_table::{ColumnConstraint, ContentArrangement, Table, Width, presets::NOTHING};
    let mut t = Table::new();
    t.load_style(NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(width.unwrap_or(u16::MAX))
        .set_header(cols.iter().map(|c| c.to_uppercase()));
    for r in rows {
        t.add_row(cols.iter().map(|c| text(r, c)));
    }
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
        if width.is_none() {
            c.set_constraint(ColumnConstraint::UpperBoundary(Width::Fixed(62)));
        }
    }
    let mut text: String = t
        .lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n");
    text.push('\n');
    text
}

/// Keys of a reply that hold its rows.
const ROW_KEYS: [&str; 5] = ["items", "results", "points", "nodes", "records"];

/// JSON with each row object's keys in `order` (serde_json's maps are sorted), the rest as sent.
enum Ordered<'a> {
    Row(&'a Map<String, Value>, &'a [String]),
    Rows(&'a [Value], &'a [String]),
    Holder(&'a Map<String, Value>, &'a [String]),
    Plain(&'a Value),
}

impl<'a> Ordered<'a> {
    fn of(v: &'a Value, order: &'a [String]) -> Ordered<'a> {
        match v {
            Value::Array(a) => Ordered::Rows(a, order),
            Value::Object(o)
                if ROW_KEYS
                    .iter()
                    .any(|k| o.get(*k).is_some_and(Value::is_array)) =>
            {
                Ordered::Holder(o, order)
            }
            Value::Object(o) => Ordered::Row(o, order),
            other => Ordered::Plain(other),
        }
    }
}

impl serde::Serialize for Ordered<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Ordered::Row(o, order) => {
                let mut m = s.serialize_map(Some(o.len()))?;
                for k in order.iter().filter(|k| o.contains_key(*k)) {
                    m.serialize_entry(k, &o[k])?;
                }
                for (k, x) in o.iter().filter(|(k, _)| !order.contains(k)) {
                    m.serialize_entry(k, x)?;
                }
                m.end()
            }
            Ordered::Rows(a, order) => {
                let mut q = s.serialize_seq(Some(a.len()))?;
                for x in a.iter() {
                    match x {
                        Value::Object(o) => q.serialize_element(&Ordered::Row(o, order))?,
                        other => q.serialize_element(other)?,
                    }
                }
                q.end()
            }
            Ordered::Holder(o, order) => {
                let mut m = s.serialize_map(Some(o.len()))?;
                for (k, x) in o.iter() {
                    match x {
                        Value::Array(a) if ROW_KEYS.contains(&k.as_str()) => {
                            m.serialize_entry(k, &Ordered::Rows(a, order))?
                        }
                        other => m.serialize_entry(k, other)?,
                    }
                }
                m.end()
            }
            Ordered::Plain(v) => v.serialize(s),
        }
    }
}

/// Shows `v` as `view` says.
pub fn render(v: &Value, view: &View, out: &mut dyn Write) -> anyhow::Result<()> {
    let rows = rows(v);
    let cols = columns(&rows, view);
    match view.output {
        Output::Json => {
            let order: &[String] = if view.fields.is_some() { &cols } else { &[] };
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&Ordered::of(v, order))?
            )?;
        }
        Output::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record(&cols)?;
            for r in &rows {
                w.write_record(cols.iter().map(|c| text(r, c)))?;
            }
            out.write_all(&w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?;
        }
        Output::Table => {
            out.write_all(table(&cols, &rows, view.width).as_bytes())?;
            if let Some(total) = v.get("total") {
                writeln!(out, "({} of {total}, page {})", rows.len(), v["page"])?;
            }
        }
    }
    Ok(())
}

/// The terminal's width when standard output is one (`COLUMNS` when set wins); `None` for a pipe
/// or file, where lines are not wrapped.
pub fn terminal_width() -> Option<u16> {
    if let Some(n) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|n| *n >= 20)
    {
        return Some(n);
    }
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct passed; fd 1 may be anything, and
    // a failure leaves it zeroed, which is read as "not a terminal".
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_col >= 20).then_some(ws.ws_col)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn width(s: &str) -> usize {
        // What a terminal shows: CJK characters take two columns.
        s.chars()
            .map(|c| {
                if ('\u{4e00}'..='\u{9fff}').contains(&c) {
                    2
                } else {
                    1
                }
            })
            .sum()
    }

    fn show(v: &Value, output: Output, fields: Option<&str>, w: Option<u16>) -> String {
        let mut out = Vec::new();
        let view = View {
            output,
            fields,
            empty: &["id", "name", "state"],
            width: w,
        };
        render(v, &view, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn tables_align_by_display_width_and_wrap_long_cells() {
        let v = json!({ "items": [
            { "id": "ep-1", "name": "订单数据库", "state": "Available" },
            { "id": "ep-22", "name": "db", "state": "Pending", "description": "x".repeat(150) },
        ]});
        let text = show(&v, Output::Table, None, None);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID"), "{text}");
        // The STATE column starts at the same display column in the header and both rows.
        let at = |l: &str, word: &str| width(&l[..l.find(word).unwrap()]);
        let col = at(lines[0], "STATE");
        assert_eq!(at(lines[1], "Available"), col, "{text}");
        assert_eq!(at(lines[2], "Pending"), col, "{text}");
        // The 150-character description wraps within its column instead of making one long line.
        assert!(
            lines.iter().all(|l| width(l) < 150),
            "a line as long as the cell:\n{text}"
        );
        assert!(
            text.matches('x').count() == 150,
            "nothing of the cell is lost:\n{text}"
        );
        // Fitted to an 80-column terminal, CJK included.
        let text = show(&v, Output::Table, None, Some(80));
        assert!(text.lines().all(|l| width(l) <= 80), "{text}");
        assert_eq!(text.matches('x').count(), 150, "{text}");
    }

    fn service() -> Value {
        json!({ "items": [{
            "auto_accept": false, "backends": ["198.18.100.10", "198.18.100.11"],
            "created_at": 1_795_428_000u64, "created_time": "2026-11-23T10:00:00Z",
            "id": "svc-1", "name": "web", "owner": "provider",
            "port_mappings": [{ "protocol": "tcp", "service_port": 8080, "terminal_port": 80 }],
            "tags": [{ "key": "team", "value": "web" }],
            "health_check": { "enabled": true, "interval_secs": 5 },
            "endpoint_flow_limits": { "ep-1": 5 },
            "security_groups": [{ "priority": 2, "security_group_id": "sg-b" },
                                { "priority": 1, "security_group_id": "sg-a" }],
        }], "page": 1, "per_page": 100, "total": 1 })
    }

    #[test]
    fn id_and_name_lead_times_are_rfc3339_and_nested_values_are_summarised() {
        let text = show(&service(), Output::Table, None, None);
        let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(&header[..2], ["ID", "NAME"], "{text}");
        assert_eq!(header.last(), Some(&"CREATED_TIME"), "{text}");
        assert!(
            !header.contains(&"CREATED_AT"),
            "Unix seconds stay out: {text}"
        );
        for shown in [
            "tcp 80→8080",
            "team=web",
            "every 5s",
            "ep-1=5",
            "1:sg-a, 2:sg-b",
            "198.18.100.10, 198.18.100.11",
            "2026-11-23T10:00:00Z",
            "(1 of 1, page 1)",
        ] {
            assert!(text.contains(shown), "{shown}: {text}");
        }
        assert!(
            !text.contains('{') && !text.contains('['),
            "no raw JSON: {text}"
        );
        let csv = show(&service(), Output::Csv, None, None);
        assert!(csv.starts_with("id,name,"), "{csv}");
        assert!(csv.contains("tcp 80→8080") && !csv.contains('{'), "{csv}");
        // History points: their time, not Unix seconds.
        let points = json!({ "points": [{ "ts": 1_795_428_000u64, "fwd_bytes": 5 }] });
        let text = show(&points, Output::Table, None, None);
        assert!(
            text.starts_with("TIME") && text.contains("2026-11-23T10:00:00Z"),
            "{text}"
        );
    }

    #[test]
    fn fields_keep_their_order_in_every_format_and_empty_lists_have_headers() {
        let f = Some("name,created_at,id");
        let text = show(&service(), Output::Table, f, None);
        let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["NAME", "CREATED_AT", "ID"]);
        let csv = show(&service(), Output::Csv, f, None);
        assert!(
            csv.starts_with("name,created_at,id\nweb,1795428000,svc-1"),
            "{csv}"
        );
        let json = show(&service(), Output::Json, f, None);
        let (n, c, i) = (
            json.find("\"name\"").unwrap(),
            json.find("\"created_at\"").unwrap(),
            json.find("\"id\"").unwrap(),
        );
        assert!(n < c && c < i, "{json}");
        let back: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back, service(), "the same JSON, reordered");
        let empty = json!({ "items": [], "page": 1, "per_page": 100, "total": 0 });
        let text = show(&empty, Output::Table, None, None);
        assert!(text.starts_with("ID  NAME  STATE"), "{text}");
        assert_eq!(show(&empty, Output::Csv, None, None), "id,name,state\n");
        assert_eq!(show(&empty, Output::Csv, f, None), "name,created_at,id\n");
    }
}
