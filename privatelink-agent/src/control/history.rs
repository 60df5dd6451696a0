//! A link's history from whichever API server answers: the points of the node this server runs
//! beside (if any), and those of every live node that publishes where its API answers, read there
//! with the caller's own token (so each node checks the tenancy again) and summed bucket by bucket.
//! A node that never carried the link answers with no points; one out of reach is named in the
//! answer's `sources` and the rest is summed.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    error::ApiError,
    monitoring::{self, Period, Point},
    plane::ControlPlane,
};

/// How long one node may take to answer.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// One node asked, and whether its points are in the sum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Source {
    pub node: String,
    pub ok: bool,
    /// Why its points are missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The summed points of the period and of the compared one.
pub struct Gathered {
    pub points: Vec<Point>,
    pub compare: Option<Vec<Point>>,
    pub sources: Vec<Source>,
}

/// What a node's API answers for its own history (the fields read here).
#[derive(Deserialize)]
struct Remote {
    points: Vec<Point>,
    #[serde(default)]
    compare: Option<RemoteWindow>,
}

#[derive(Deserialize)]
struct RemoteWindow {
    points: Vec<Point>,
}

/// A request for one object's history, over one or two periods.
pub struct Ask<'a> {
    pub kind: &'a str,
    pub id: &'a str,
    pub period: &'a Period,
    pub compare: Option<&'a Period>,
    /// The caller's token, presented to the other nodes.
    pub token: &'a str,
    /// Only this node's own points (what one node asks another).
    pub local_only: bool,
}

fn local(plane: &ControlPlane, ask: &Ask, per: &Period) -> Option<Result<Vec<Point>, String>> {
    let h = plane.node_local()?;
    let stored = per.stored();
    Some(
        h.history(ask.kind, ask.id, &stored)
            .unwrap_or_else(|| Err("this node keeps no monitoring history".into()))
            .map(|p| {
                if stored.granularity == per.granularity {
                    p
                } else {
                    monitoring::roll_up(&p, per.granularity)
                }
            }),
    )
}

fn remote(url: &str, ask: &Ask) -> Result<(Vec<Point>, Option<Vec<Point>>), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(PEER_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let mut q = format!(
        "{url}/v1/history/{}/{}?local=true&period={}..{}&granularity={}",
        ask.kind,
        ask.id,
        ask.period.from,
        ask.period.to,
        ask.period.granularity_name()
    );
    if let Some(c) = ask.compare {
        q.push_str(&format!("&compare_to={}", c.from));
    }
    let mut r = agent
        .get(&q)
        .header("Authorization", &format!("Bearer {}", ask.token))
        .call()
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    if status != 200 {
        let text = r.body_mut().read_to_string().unwrap_or_default();
        return Err(format!(
            "HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        ));
    }
    let v: Remote = r.body_mut().read_json().map_err(|e| e.to_string())?;
    Ok((v.points, v.compare.map(|c| c.points)))
}

/// The history `ask` asks for, summed over this node and the others.
pub fn gather(plane: &ControlPlane, ask: &Ask) -> Result<Gathered, ApiError> {
    let here = plane.node_local().and_then(|l| l.report()).map(|r| r.node);
    let peers: Vec<(String, String)> = if ask.local_only {
        Vec::new()
    } else {
        plane
            .nodes()
            .map_err(|e| ApiError::new(503, "store_unavailable", e.to_string()))?
            .into_iter()
            .filter(|n| n.status == super::store::NodeLiveness::Live)
            .filter(|n| Some(&n.node) != here.as_ref())
            .filter_map(|n| Some((n.node, n.api?)))
            .collect()
    };
    let mine_now = local(plane, ask, ask.period);
    if mine_now.is_none() && peers.is_empty() {
        return Err(ApiError::new(
            404,
            "no_history",
            "this server keeps no monitoring history, and no live node says where its API \
             answers (a node publishes its [api] listen address, or [api] advertise)",
        ));
    }
    // This node's answer first, then every other node's, asked at once (the slowest one bounds
    // the wait).
    type Answer = Result<(Vec<Point>, Option<Vec<Point>>), String>;
    let mut answers: Vec<(String, Answer)> = Vec::new();
    if let Some(now) = mine_now {
        let then = ask.compare.and_then(|c| local(plane, ask, c)).transpose();
        let mine = now.and_then(|n| then.map(|t| (n, t)));
        // Asked by another server: its own failure is the answer.
        if let (true, Err(e)) = (ask.local_only, &mine) {
            return Err(ApiError::new(503, "history_unavailable", e.clone()));
        }
        answers.push((here.unwrap_or_else(|| "this node".into()), mine));
    }
    std::thread::scope(|s| {
        let asked: Vec<_> = peers
            .iter()
            .map(|(node, url)| (node, s.spawn(move || remote(url, ask))))
            .collect();
        for (node, h) in asked {
            let answer = h
                .join()
                .unwrap_or_else(|_| Err("the request panicked".into()));
            answers.push((node.clone(), answer));
        }
    });
    let mut out = Gathered {
        points: Vec::new(),
        compare: ask.compare.map(|_| Vec::new()),
        sources: Vec::new(),
    };
    for (node, answer) in answers {
        let error = match answer {
            Ok((n, t)) => {
                monitoring::add(&mut out.points, &n);
                if let (Some(into), Some(t)) = (out.compare.as_mut(), t) {
                    monitoring::add(into, &t);
                }
                None
            }
            Err(e) => {
                log::warn!("history: node {node} did not answer: {e}");
                Some(e)
            }
        };
        out.sources.push(Source {
            node,
            ok: error.is_none(),
            error,
        });
    }
    if !out.sources.iter().any(|s| s.ok) {
        let why: Vec<String> = out
            .sources
            .iter()
            .map(|s| format!("{}: {}", s.node, s.error.as_deref().unwrap_or("")))
            .collect();
        return Err(ApiError::new(
            503,
            "history_unavailable",
            format!("no node answered with its history ({})", why.join("; ")),
        ));
    }
    Ok(out)
}
