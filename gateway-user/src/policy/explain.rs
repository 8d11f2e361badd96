//! `agentgate policy explain`: the facts of a statement and the decision,
//! with the rule that made it, for a given identity.

use std::net::IpAddr;
use std::path::Path;

use serde_json::json;

use super::{decide, store, Who};
use crate::sql::analyze;

/// Builds a `Who` from `key=value` pairs: agent, user, database, addr, uid,
/// gid, comm, cgroup.
pub fn who_from_pairs(pairs: &[String]) -> Result<Who, String> {
    let mut who = Who::default();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("--identity {pair:?}: want key=value"))?;
        let bad = |what: &str| format!("--identity {k}: {v:?} is not {what}");
        match k {
            "agent" => who.agent = Some(v.to_owned()),
            "user" | "startup_user" => who.startup_user = v.to_owned(),
            "database" => who.database = v.to_owned(),
            "addr" | "client_addr" => who.client_addr = Some(v.parse::<IpAddr>().map_err(|_| bad("an address"))?),
            "uid" => who.uid = Some(v.parse().map_err(|_| bad("a number"))?),
            "gid" => who.gid = Some(v.parse().map_err(|_| bad("a number"))?),
            "comm" => who.comm = Some(v.to_owned()),
            "cgroup" => who.cgroup = Some(v.to_owned()),
            _ => {
                return Err(format!(
                    "--identity: unknown key {k:?} (agent, user, database, addr, uid, gid, comm, cgroup)"
                ))
            }
        }
    }
    Ok(who)
}

/// The explanation as JSON.
pub fn explain(policy_path: &Path, who: &Who, sql: &str) -> Result<serde_json::Value, Vec<String>> {
    let policy = store::load(policy_path)?;
    let identities = policy.identities_of(who);
    let analysis = analyze(sql);
    let decision = decide(Some(&policy), &identities, &analysis);
    let statements: Vec<_> = analysis
        .statements
        .iter()
        .map(|s| {
            let d = policy.decide_statement(s, &identities);
            json!({
                "text": s.text,
                "kinds": s.kinds,
                "objects": s.objects,
                "functions": s.functions,
                "features": s.features,
                "decision": {"action": d.action, "rule": &*d.rule, "mode": d.mode, "reason": d.reason},
            })
        })
        .collect();
    Ok(json!({
        "policy": &*policy.label,
        "identities": identities.iter().map(|i| policy.identities[*i].name.clone()).collect::<Vec<_>>(),
        "parse_error": analysis.parse_error,
        "statements": statements,
        "decision": {
            "action": decision.action,
            "rule": &*decision.rule,
            "mode": decision.mode,
            "controls": &*decision.controls,
            "reason": decision.reason,
        },
    }))
}
