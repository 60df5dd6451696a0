//! Field validation. Every function names the offending field in its error.
use std::net::IpAddr;

use ipnet::IpNet;

use super::error::{ApiError, ApiResult};

pub const NAME_MAX: usize = 80;
pub const TAGS_MAX: usize = 10;
pub const TAG_KEY_MAX: usize = 36;
pub const TAG_VALUE_MAX: usize = 43;
pub const DESCRIPTION_MAX: usize = 255;
pub const MAPPINGS_PER_REQUEST: usize = 50;
pub const GROUPS_PER_ENDPOINT: usize = 5;
pub const RULES_PER_GROUP: usize = 100;

/// A DNS name a provider publishes for private DNS: at most 253 characters, at least two labels
/// of 1–63 letters, digits and hyphens (not at either end of a label), a top-level label that is
/// not all digits, and not inside the cluster's own `zone` (that holds the generated names).
/// Returns it lowercased, without a trailing dot.
pub fn dns_name(field: &str, v: &str, zone: &str) -> ApiResult<String> {
    let bad = |m: String| Err(ApiError::invalid("invalid_dns_name", field, m));
    let name = v.strip_suffix('.').unwrap_or(v).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return bad(format!(
            "a DNS name is 1 to 253 characters, got {}",
            name.len()
        ));
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return bad(format!(
            "{v:?} has one label: use a name like db.example.com"
        ));
    }
    for (i, l) in labels.iter().enumerate() {
        if l.is_empty() || l.len() > 63 {
            return bad(format!(
                "label {} of {v:?} has {} characters: labels are 1 to 63",
                i + 1,
                l.len()
            ));
        }
        if let Some(c) = l
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return bad(format!(
                "{c:?} in label {l:?} is not allowed: letters, digits and '-' only"
            ));
        }
        if l.starts_with('-') || l.ends_with('-') {
            return bad(format!("label {l:?} starts or ends with '-'"));
        }
    }
    if labels[labels.len() - 1].chars().all(|c| c.is_ascii_digit()) {
        return bad(format!("{v:?} ends in an all-digit label"));
    }
    let zone = zone.to_ascii_lowercase();
    if name == zone || name.ends_with(&format!(".{zone}")) {
        return bad(format!(
            "{v:?} is inside {zone}, which holds the generated endpoint names"
        ));
    }
    Ok(name)
}

/// CJK Unified Ideographs (with extension A and the compatibility block).
fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0xF900..=0xFAFF)
}

/// 1–80 characters of ASCII letters, digits, `_ - .` and CJK ideographs.
pub fn name(field: &str, v: &str) -> ApiResult<()> {
    let n = v.chars().count();
    if n == 0 || n > NAME_MAX {
        return Err(ApiError::invalid(
            "invalid_name",
            field,
            format!("must be 1 to {NAME_MAX} characters, got {n}"),
        ));
    }
    if let Some(c) = v
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "_-.".contains(c) || is_cjk(c)))
    {
        return Err(ApiError::invalid(
            "invalid_name",
            field,
            format!("{c:?} is not allowed: use letters, digits, '_', '-', '.' and CJK ideographs"),
        ));
    }
    Ok(())
}

fn tag_chars(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// At most 10 tags, unique keys of 1–36 and values of 0–43 characters of `[A-Za-z0-9_-]`.
pub fn tags(tags: &[super::types::Tag]) -> ApiResult<()> {
    if tags.len() > TAGS_MAX {
        return Err(ApiError::invalid(
            "too_many_tags",
            "tags",
            format!("at most {TAGS_MAX} tags, got {}", tags.len()),
        ));
    }
    for (i, t) in tags.iter().enumerate() {
        if t.key.is_empty() || t.key.len() > TAG_KEY_MAX || !tag_chars(&t.key) {
            return Err(ApiError::invalid(
                "invalid_tag",
                format!("tags[{i}].key"),
                format!("tag keys are 1 to {TAG_KEY_MAX} characters of A-Z a-z 0-9 _ -"),
            ));
        }
        if t.value.len() > TAG_VALUE_MAX || !tag_chars(&t.value) {
            return Err(ApiError::invalid(
                "invalid_tag",
                format!("tags[{i}].value"),
                format!("tag values are 0 to {TAG_VALUE_MAX} characters of A-Z a-z 0-9 _ -"),
            ));
        }
        if tags[..i].iter().any(|o| o.key == t.key) {
            return Err(ApiError::invalid(
                "duplicate_tag",
                format!("tags[{i}].key"),
                format!("tag key {:?} repeats", t.key),
            ));
        }
    }
    Ok(())
}

/// Applies an update of an object's name and tags, both validated before either changes.
pub fn rename_retag(
    name: &mut String,
    tags: &mut Vec<super::types::Tag>,
    new_name: Option<String>,
    new_tags: Option<Vec<super::types::Tag>>,
) -> ApiResult<()> {
    if let Some(n) = &new_name {
        self::name("name", n)?;
    }
    if let Some(t) = &new_tags {
        self::tags(t)?;
    }
    if let Some(n) = new_name {
        *name = n;
    }
    if let Some(t) = new_tags {
        *tags = t;
    }
    Ok(())
}

/// A port 1–65535 (taken wide so that 0 and 65536 get a clear error rather than a parse failure).
pub fn port(field: &str, v: i64) -> ApiResult<u16> {
    if (1..=65535).contains(&v) {
        Ok(v as u16)
    } else {
        Err(ApiError::invalid(
            "invalid_port",
            field,
            format!("ports are 1 to 65535, got {v}"),
        ))
    }
}

pub fn description(field: &str, v: &str) -> ApiResult<()> {
    let n = v.chars().count();
    if n > DESCRIPTION_MAX {
        return Err(ApiError::invalid(
            "invalid_description",
            field,
            format!("at most {DESCRIPTION_MAX} characters, got {n}"),
        ));
    }
    Ok(())
}

/// A CIDR with no host bits set, its address written as [`ip`] takes it (no leading zeros in
/// IPv4 octets), and not an IPv4-mapped IPv6 range (`::ffff:0:0/96` aliases IPv4 space).
pub fn cidr(field: &str, v: &str) -> ApiResult<IpNet> {
    if let Some((addr, _)) = v.split_once('/')
        && addr.parse::<IpAddr>().is_err()
        && addr.split('.').any(|o| o.len() > 1 && o.starts_with('0'))
    {
        return Err(ApiError::invalid(
            "invalid_cidr",
            field,
            format!("{v:?} has an octet with a leading zero; write it without (198.18.0.0/16)"),
        ));
    }
    let net: IpNet = v.parse().map_err(|_| {
        ApiError::invalid(
            "invalid_cidr",
            field,
            format!("{v:?} is not a CIDR such as 198.18.0.0/24"),
        )
    })?;
    if let IpNet::V6(n) = net
        && n.addr().to_ipv4_mapped().is_some()
    {
        return Err(ApiError::invalid(
            "invalid_cidr",
            field,
            format!("{v} is an IPv4-mapped IPv6 range: use the IPv4 CIDR instead"),
        ));
    }
    if net.trunc() != net {
        return Err(ApiError::invalid(
            "invalid_cidr",
            field,
            format!("{v} has host bits set; did you mean {}?", net.trunc()),
        ));
    }
    Ok(net)
}

pub fn ip(field: &str, v: &str) -> ApiResult<IpAddr> {
    v.parse()
        .map_err(|_| ApiError::invalid("invalid_ip", field, format!("{v:?} is not an IP address")))
}

/// An account id: a 10-digit number or a short name (2–32 of `a-z 0-9 -`, starting with a letter).
pub fn account_id(field: &str, v: &str) -> ApiResult<()> {
    let digits = v.len() == 10 && v.chars().all(|c| c.is_ascii_digit());
    let short = (2..=32).contains(&v.len())
        && v.starts_with(|c: char| c.is_ascii_lowercase())
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if digits || short {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "invalid_account_id",
            field,
            "account ids are a 10-digit number or 2 to 32 characters of a-z 0-9 - starting with a letter",
        ))
    }
}

/// Security-group rule ports: `all`, `N` or `N-M` (1–65535, N ≤ M). Returns (from, to).
pub fn rule_ports(field: &str, v: &str) -> ApiResult<(u16, u16)> {
    if v == "all" {
        return Ok((1, 65535));
    }
    let bad = || {
        ApiError::invalid(
            "invalid_port_range",
            field,
            format!("{v:?}: use all, N or N-M with ports 1 to 65535"),
        )
    };
    let (a, b) = match v.split_once('-') {
        Some((a, b)) => (a, b),
        None => (v, v),
    };
    let a: i64 = a.trim().parse().map_err(|_| bad())?;
    let b: i64 = b.trim().parse().map_err(|_| bad())?;
    let (a, b) = (
        port(field, a).map_err(|_| bad())?,
        port(field, b).map_err(|_| bad())?,
    );
    if a > b {
        return Err(ApiError::invalid(
            "invalid_port_range",
            field,
            format!("{v}: the range is reversed"),
        ));
    }
    Ok((a, b))
}

/// An object id as the server makes them: a lowercase prefix, '-' and 8 hex digits.
pub fn object_id(field: &str, v: &str) -> ApiResult<()> {
    let ok = v.split_once('-').is_some_and(|(p, h)| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_lowercase())
            && h.len() == 8
            && h.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "invalid_id",
            field,
            format!("{v:?} is not an id such as ep-0a1b2c3d"),
        ))
    }
}

/// Items of a batch request in field `field`: at most [`BATCH_MAX`] `what`, each passing `each`
/// (which names `field[i]` in its error).
pub fn batch(
    field: &str,
    what: &str,
    items: &[String],
    each: fn(&str, &str) -> ApiResult<()>,
) -> ApiResult<()> {
    if items.len() > BATCH_MAX {
        return Err(ApiError::invalid(
            "too_many_items",
            field,
            format!(
                "at most {BATCH_MAX} {what} per request, got {}",
                items.len()
            ),
        ));
    }
    for (i, v) in items.iter().enumerate() {
        each(&format!("{field}[{i}]"), v)?;
    }
    Ok(())
}

/// The most items a batch request (accept, reject, remove, disallow) takes.
pub const BATCH_MAX: usize = 100;

/// The admin token rule, for every place that reads one: the file's text is one token on one
/// line (surrounding whitespace ignored) of at least 16 characters. Returns the token.
pub fn admin_token(text: &str) -> Result<String, String> {
    let token = text.trim();
    if token.lines().count() > 1 {
        return Err("the file holds more than one line; it must hold the token alone".into());
    }
    if token.chars().count() < 16 {
        return Err("the token must be at least 16 characters".into());
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admin_token_is_one_line_of_at_least_16_characters() {
        assert_eq!(
            admin_token("  0123456789abcdef\n").as_deref(),
            Ok("0123456789abcdef")
        );
        assert!(admin_token("0123456789abcde").is_err(), "15 characters");
        assert!(admin_token("").is_err());
        assert!(
            admin_token("0123456789abcdef\nsecond-token-line").is_err(),
            "two lines"
        );
    }
    use crate::control::types::Tag;

    #[test]
    fn names_at_and_beyond_the_limits() {
        assert!(name("name", &"a".repeat(80)).is_ok());
        assert_eq!(
            name("name", &"a".repeat(81)).unwrap_err().code,
            "invalid_name"
        );
        assert!(name("name", "").is_err());
        assert!(
            name("name", "数据库-主.prod_1").is_ok(),
            "CJK ideographs and _ - . are allowed"
        );
        assert!(
            name("name", &"数".repeat(80)).is_ok(),
            "80 characters, not bytes"
        );
        assert!(name("name", &"数".repeat(81)).is_err());
        for bad in ["a b", "a/b", "é", "ﾃｽﾄ", "a\n"] {
            let e = name("x.name", bad).unwrap_err();
            assert_eq!(
                (e.code, e.field.as_deref()),
                ("invalid_name", Some("x.name")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ports_at_the_edges() {
        assert!(port("p", 0).is_err());
        assert_eq!(port("p", 1).unwrap(), 1);
        assert_eq!(port("p", 65535).unwrap(), 65535);
        let e = port("port_mappings[0].terminal_port", 65536).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("port_mappings[0].terminal_port"));
        assert_eq!(rule_ports("r", "all").unwrap(), (1, 65535));
        assert_eq!(rule_ports("r", "80").unwrap(), (80, 80));
        assert_eq!(rule_ports("r", "80-90").unwrap(), (80, 90));
        for bad in ["0", "90-80", "1-65536", "x", "80-", ""] {
            assert!(rule_ports("r", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tags_at_and_beyond_the_limits() {
        let t = |k: &str, v: &str| Tag {
            key: k.into(),
            value: v.into(),
        };
        let ten: Vec<Tag> = (0..10).map(|i| t(&format!("k{i}"), "v")).collect();
        assert!(tags(&ten).is_ok());
        let mut eleven = ten.clone();
        eleven.push(t("k10", ""));
        assert_eq!(tags(&eleven).unwrap_err().code, "too_many_tags");
        assert!(tags(&[t(&"k".repeat(36), &"v".repeat(43))]).is_ok());
        assert!(tags(&[t(&"k".repeat(37), "")]).is_err());
        assert!(tags(&[t("k", &"v".repeat(44))]).is_err());
        assert!(tags(&[t("", "v")]).is_err());
        assert!(tags(&[t("k", "")]).is_ok(), "empty values are allowed");
        assert!(tags(&[t("a.b", "v")]).is_err());
        assert_eq!(
            tags(&[t("k", "1"), t("k", "2")]).unwrap_err().code,
            "duplicate_tag"
        );
    }

    #[test]
    fn cidrs_and_ids() {
        assert!(cidr("c", "198.18.0.0/24").is_ok());
        assert!(cidr("c", "2001:db8::/64").is_ok());
        for bad in ["198.18.0.1/24", "198.18.0.0/33", "198.18.0.0", "x/24", ""] {
            assert_eq!(cidr("c", bad).unwrap_err().code, "invalid_cidr", "{bad}");
        }
        assert!(account_id("a", "1234567890").is_ok());
        assert!(account_id("a", "acme-prod").is_ok());
        for bad in [
            "123456789",
            "12345678901",
            "Acme",
            "-acme",
            "a",
            &"a".repeat(33),
        ] {
            assert!(account_id("a", bad).is_err(), "{bad}");
        }
        assert!(description("d", &"x".repeat(255)).is_ok());
        assert!(description("d", &"x".repeat(256)).is_err());
    }
}
