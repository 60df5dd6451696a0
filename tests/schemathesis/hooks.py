"""Value generators for the string formats of privatelink's OpenAPI document.

The document names custom formats (`cidr`, `ip`, `dns-name`, `port-range`) and states each rule in
the schema's description. Schemathesis cannot know those rules, so these strategies generate values
that follow them; its negative phase still sends values that break them. Addresses stay inside the
documentation ranges 198.18.0.0/15 and 2001:db8::/32.
"""
import ipaddress

import schemathesis
from hypothesis import strategies as st
from schemathesis.core.parameters import ParameterLocation

V4 = (int(ipaddress.ip_address("198.18.0.0")), int(ipaddress.ip_address("198.19.255.255")))
V6 = (int(ipaddress.ip_address("2001:db8::")), int(ipaddress.ip_address("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")))

v4_ip = st.integers(*V4).map(lambda n: str(ipaddress.IPv4Address(n)))
v6_ip = st.integers(*V6).map(lambda n: str(ipaddress.IPv6Address(n)))
v4_net = st.tuples(st.integers(*V4), st.integers(15, 32)).map(
    lambda t: str(ipaddress.IPv4Network(t, strict=False)))
v6_net = st.tuples(st.integers(*V6), st.integers(32, 128)).map(
    lambda t: str(ipaddress.IPv6Network(t, strict=False)))
label = st.from_regex(r"\A[a-z]([a-z0-9-]{0,8}[a-z0-9])?\Z")
dns_name = st.tuples(label, st.sampled_from(["example", "test", "corp"])).map(".".join)
ports = st.integers(1, 65535)
port_range = st.one_of(
    st.just("all"),
    ports.map(str),
    st.tuples(ports, ports).map(lambda t: f"{min(t)}-{max(t)}"),
)

schemathesis.openapi.format("ip", st.one_of(v4_ip, v6_ip))
schemathesis.openapi.format("cidr", st.one_of(v4_net, v6_net))
schemathesis.openapi.format("cidr6", v6_net)
schemathesis.openapi.format("dns-name", dns_name)
schemathesis.openapi.format("port-range", port_range)


def _unique_by(items, key):
    """The items whose `key` value was not seen before (first kept)."""
    seen, out = set(), []
    for item in items:
        k = key(item) if isinstance(item, dict) else None
        if k is None or k not in seen:
            out.append(item)
            if k is not None:
                seen.add(k)
    return out


def fix_cross_field_rules(body):
    """Rules across fields, which JSON Schema cannot state (each one is in the schema's
    descriptions and enforced by the server with a 400): tag keys are unique, a health check's
    timeout is at most its interval, bindings name each group and priority once, a service's
    backends and (protocol, terminal port) pairs are unique."""
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("tags"), list):
        body["tags"] = _unique_by(body["tags"], lambda t: _hashable(t.get("key")))
    hc = body.get("health_check")
    if isinstance(hc, dict):
        i, t = hc.get("interval_secs"), hc.get("timeout_secs")
        if _int(i) and _int(t) and t > i:
            hc["interval_secs"], hc["timeout_secs"] = t, i
    if isinstance(body.get("security_groups"), list):
        groups = _unique_by(body["security_groups"], lambda b: _hashable(b.get("security_group_id")))
        body["security_groups"] = _unique_by(groups, lambda b: _hashable(b.get("priority")))
    if isinstance(body.get("backends"), list):
        body["backends"] = _unique_by(body["backends"], lambda b: b)
    if isinstance(body.get("port_mappings"), list):
        body["port_mappings"] = _unique_by(
            body["port_mappings"],
            lambda m: _hashable((m.get("protocol"), m.get("terminal_port"))))
    return body


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _hashable(v):
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def _net(v):
    try:
        return ipaddress.ip_network(v)
    except (TypeError, ValueError):
        return None


def fix_networks_and_subnets(body):
    """A network's CIDRs do not overlap each other; a subnet with `ipv6_cidr` has an IPv4 `cidr`."""
    if not isinstance(body, dict):
        return body
    cidrs = body.get("cidrs")
    if isinstance(cidrs, list):
        kept, nets = [], []
        for c in cidrs:
            n = _net(c)
            if n is None or not any(n.version == o.version and n.overlaps(o) for o in nets):
                kept.append(c)
                if n is not None:
                    nets.append(n)
        body["cidrs"] = kept
    if "ipv6_cidr" in body:
        c = _net(body.get("cidr"))
        if c is not None and c.version == 6:
            del body["ipv6_cidr"]
    return body


def fix_endpoint_addresses(body):
    """An endpoint's `ip`/`ipv6` fit its `ip_address_type`: ipv4 has no `ipv6`, ipv6 gives one of
    the two, dualstack an IPv4 `ip` and an IPv6 `ipv6`."""
    kind = body.get("ip_address_type")
    ip, ip6 = _addr(body.get("ip")), _addr(body.get("ipv6"))
    if kind == "ipv4":
        body.pop("ipv6", None)
    elif kind == "ipv6" and body.get("ip") is not None and body.get("ipv6") is not None:
        del body["ipv6"]
    elif kind == "dualstack":
        if ip is not None and ip.version != 4:
            del body["ip"]
        if ip6 is not None and ip6.version != 6:
            del body["ipv6"]
    return body


def _addr(v):
    try:
        return ipaddress.ip_address(v)
    except (TypeError, ValueError):
        return None


@schemathesis.hook
def map_case(context, case):
    """Positive bodies only (every phase): a negative one must stay as broken as it was made."""
    meta = case.meta
    if meta is not None and meta.is_negative_at(ParameterLocation.BODY):
        return case
    if isinstance(case.body, dict):
        case.body = fix_endpoint_addresses(fix_networks_and_subnets(fix_cross_field_rules(case.body)))
    return case
