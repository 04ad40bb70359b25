//! A local Redis Cluster for tests: real `redis-server` processes in cluster mode on free loopback
//! ports, joined with `redis-cli --cluster create`, killed when dropped (also on panic).
//!
//! Failures are fast: nodes run with a node timeout of [`NODE_TIMEOUT_MS`], so a killed master's
//! replica takes over within a few seconds.

use std::{
    collections::BTreeMap,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{redis_cli_binary, RedisServer, INSTALL_HINT};

/// The cluster node timeout of every node, in ms: how long a silent node takes to be suspected.
pub const NODE_TIMEOUT_MS: u64 = 1000;
/// The number of hash slots.
pub const SLOTS: u16 = 16384;

const SETTLE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// A Redis Cluster of real processes. Every node is killed when this is dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// One node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node id.
    pub id: String,
    /// The port it listens on.
    pub port: u16,
    /// Whether it is a master (else a replica).
    pub master: bool,
    /// Whether the cluster marked it failed (`fail`, not the mere suspicion `fail?`).
    pub failed: bool,
    /// The id of its master, for a replica.
    pub master_id: Option<String>,
    /// The slot ranges it serves (inclusive), for a master.
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas_per_master` replicas each and waits until every
    /// node reports `cluster_state:ok` with all slots covered and every replica in sync.
    ///
    /// # Panics
    ///
    /// When `redis-server` or `redis-cli` is missing (with an install hint), `masters < 3` (what
    /// `redis-cli --cluster create` accepts), or the cluster does not form in time.
    pub fn start(masters: usize, replicas_per_master: usize) -> Self {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters");
        let count = masters * (1 + replicas_per_master);
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    // Relative to the node's own scratch directory, so each node has its own.
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &NODE_TIMEOUT_MS.to_string(),
                    // Replicas stay where they were put, so tests know who replicates whom.
                    "--cluster-allow-replica-migration",
                    "no",
                    // A (re)joining replica syncs at once instead of after the default 5 s.
                    "--repl-diskless-sync-delay",
                    "0",
                ])
            })
            .collect();
        let cluster = Self { nodes };
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port())),
        );
        args.extend([
            "--cluster-replicas".into(),
            replicas_per_master.to_string(),
            "--cluster-yes".into(),
        ]);
        let out = run(
            Command::new(redis_cli_binary()).args(&args),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_until_ok();
        // `cluster_state:ok` can come before every replica has taken its master (a loaded
        // machine): wait, bounded, until the topology is the one asked for.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut topology = cluster.topology();
        while topology.iter().filter(|n| n.master).count() != masters && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            topology = cluster.topology();
        }
        let live_masters = topology.iter().filter(|n| n.master).count();
        assert_eq!(live_masters, masters, "{topology:#?}");
        cluster
    }

    /// The ports of every node started, running or not.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// `redis://127.0.0.1:PORT` of every node started.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The node on `port`.
    ///
    /// # Panics
    ///
    /// When no node of this cluster listens there.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// The ports of the nodes that are running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(RedisServer::port)
            .collect()
    }

    /// Runs `redis-cli` against the node on `port` and returns its trimmed output.
    ///
    /// # Panics
    ///
    /// When redis-cli fails or the node does not answer within 10 s.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(port, args).unwrap_or_else(|e| panic!("redis-cli -p {port} {args:?}: {e}"))
    }

    /// The cluster as a live node sees it (`CLUSTER NODES`).
    ///
    /// # Panics
    ///
    /// When no node answers.
    pub fn topology(&self) -> Vec<NodeInfo> {
        for port in self.live_ports() {
            if let Ok(out) = cli(port, &["CLUSTER", "NODES"]) {
                return parse_nodes(&out);
            }
        }
        panic!("no cluster node answers CLUSTER NODES");
    }

    /// The ports of the live masters.
    pub fn masters(&self) -> Vec<u16> {
        let live = self.live_ports();
        self.topology()
            .into_iter()
            .filter(|n| n.master && !n.failed && live.contains(&n.port))
            .map(|n| n.port)
            .collect()
    }

    /// The port of the master serving `slot`.
    ///
    /// # Panics
    ///
    /// When no master serves it.
    pub fn master_of(&self, slot: u16) -> u16 {
        self.topology()
            .into_iter()
            .find(|n| {
                n.master && !n.failed && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// The ports of the replicas of the master on `port`.
    pub fn replicas_of(&self, port: u16) -> Vec<u16> {
        let topology = self.topology();
        let Some(id) = topology
            .iter()
            .find(|n| n.port == port)
            .map(|n| n.id.clone())
        else {
            return Vec::new();
        };
        topology
            .into_iter()
            .filter(|n| n.master_id.as_deref() == Some(id.as_str()))
            .map(|n| n.port)
            .collect()
    }

    /// The node id of the node on `port`.
    ///
    /// # Panics
    ///
    /// When the node does not answer.
    pub fn node_id(&self, port: u16) -> String {
        self.cli(port, &["CLUSTER", "MYID"])
    }

    /// Kills (SIGKILL) the master serving `slot` and returns its port. Its data and its unsent
    /// replication stream are gone; call [`RedisCluster::wait_for_failover`] next.
    pub fn kill_master_of(&mut self, slot: u16) -> u16 {
        let port = self.master_of(slot);
        self.node_mut(port).stop();
        port
    }

    /// Waits until a replica of the killed master on `dead` serves `slot`, every live node agrees
    /// on who serves every slot and reports `cluster_state:ok`. Returns the new master's port.
    ///
    /// # Panics
    ///
    /// When that does not happen within 30 s.
    pub fn wait_for_failover(&self, slot: u16, dead: u16) -> u16 {
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Ok(owners) = self.settled() {
                if let Some(&port) = owners.get(&slot) {
                    if port != dead {
                        return port;
                    }
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "no replica took over slot {slot} from port {dead} within {SETTLE:?}: {:#?}",
                    self.topology()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until every live node reports `cluster_state:ok` with all slots covered, every live
    /// node agrees on who serves every slot, and every live replica is in sync with its master.
    ///
    /// # Panics
    ///
    /// When that does not happen within 30 s.
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + SETTLE;
        loop {
            match self.settled() {
                Ok(_) => return,
                Err(why) if Instant::now() > deadline => {
                    panic!("the cluster did not settle within {SETTLE:?}: {why}")
                }
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// Slot → master port, when the cluster is settled; else why not.
    fn settled(&self) -> Result<BTreeMap<u16, u16>, String> {
        let live = self.live_ports();
        let mut agreed: Option<Vec<(u16, u16, u16)>> = None;
        for &port in &live {
            let info = cli(port, &["CLUSTER", "INFO"])?;
            for want in ["cluster_state:ok", "cluster_slots_ok:16384"] {
                if !info.lines().any(|l| l.trim() == want) {
                    return Err(format!("port {port}: no {want}"));
                }
            }
            let topology = parse_nodes(&cli(port, &["CLUSTER", "NODES"])?);
            let mut ranges: Vec<(u16, u16, u16)> = topology
                .iter()
                .filter(|n| n.master && !n.failed)
                .flat_map(|n| n.slots.iter().map(move |&(a, b)| (a, b, n.port)))
                .collect();
            ranges.sort_unstable();
            if let Some(owner) = ranges.iter().find(|r| !live.contains(&r.2)) {
                return Err(format!(
                    "port {port} sees dead port {} serving slots",
                    owner.2
                ));
            }
            match &agreed {
                None => agreed = Some(ranges),
                Some(first) if *first != ranges => {
                    return Err(format!("port {port} disagrees on the slot map"));
                }
                Some(_) => {}
            }
            let me = topology
                .iter()
                .find(|n| n.port == port)
                .ok_or_else(|| format!("port {port} does not list itself"))?;
            if !me.master {
                let replication = cli(port, &["INFO", "replication"])?;
                if !replication
                    .lines()
                    .any(|l| l.trim() == "master_link_status:up")
                {
                    return Err(format!("replica {port} is not in sync"));
                }
            }
        }
        let ranges = agreed.ok_or("no live node")?;
        let mut owners = BTreeMap::new();
        for (a, b, port) in ranges {
            for slot in a..=b {
                owners.insert(slot, port);
            }
        }
        if owners.len() != usize::from(SLOTS) {
            return Err(format!("{} of {SLOTS} slots served", owners.len()));
        }
        Ok(owners)
    }

    /// Restarts a killed node on its port with its cluster config: it rejoins as a replica of the
    /// master that replaced it. Waits until it is in sync and the cluster is settled.
    ///
    /// # Panics
    ///
    /// When it does not come back in time.
    pub fn restart(&mut self, port: u16) {
        self.node_mut(port).restart();
        self.wait_until_ok();
    }

    /// Freezes the node on `port` (SIGSTOP): a replica that is frozen receives no replication.
    pub fn pause(&self, port: u16) {
        self.node(port).pause();
    }

    /// Makes the replica on `port` fall behind its master for as long as it stays frozen: freezes
    /// it (SIGSTOP) and makes its master drop the replication link (`CLIENT KILL TYPE replica`).
    /// Freezing alone is not enough: the kernel would keep receiving the replication stream into
    /// the frozen process's socket buffer, and the replica would apply it when thawed. Whatever the
    /// master acknowledges from now on exists on the master only. Thaw with
    /// [`RedisCluster::resume`].
    ///
    /// # Panics
    ///
    /// When `port` is not a replica.
    pub fn lag_replica(&self, port: u16) {
        let topology = self.topology();
        let master_id = topology
            .iter()
            .find(|n| n.port == port)
            .and_then(|n| n.master_id.clone())
            .unwrap_or_else(|| panic!("port {port} is not a replica"));
        let master = topology
            .iter()
            .find(|n| n.id == master_id)
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("the master of {port} is unknown"));
        self.pause(port);
        self.cli(master, &["CLIENT", "KILL", "TYPE", "replica"]);
    }

    /// Thaws a frozen node (SIGCONT).
    pub fn resume(&self, port: u16) {
        self.node(port).resume();
    }

    /// Moves `slot` to the master on `to` the way `redis-cli --cluster reshard` does: marks it
    /// importing on `to` and migrating on its owner, waits `dwell` (meanwhile, keys not yet moved
    /// are served by the owner and new keys by `to`, through `ASK` redirects), moves its keys with
    /// `MIGRATE` in batches, then assigns it to `to` on every master (old clients get `MOVED`).
    ///
    /// # Panics
    ///
    /// When a step fails.
    pub fn migrate_slot(&self, slot: u16, to: u16, dwell: Duration) {
        let from = self.master_of(slot);
        if from == to {
            return;
        }
        let slot_s = slot.to_string();
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        self.cli(to, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id]);
        self.cli(from, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id]);
        thread::sleep(dwell);
        loop {
            let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"]);
            let keys: Vec<&str> = keys
                .lines()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .collect();
            if keys.is_empty() {
                break;
            }
            let to_s = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_s, "", "0", "5000", "KEYS"];
            args.extend(keys);
            let out = self.cli(from, &args);
            assert!(
                out == "OK" || out == "NOKEY",
                "MIGRATE of slot {slot}: {out}"
            );
        }
        // The destination first, so that it never answers MOVED back to the source.
        self.cli(to, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
        self.cli(from, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
        for master in self.masters() {
            if master != from && master != to {
                self.cli(master, &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id]);
            }
        }
    }
}

/// The hash slot of `key` (CRC16/XMODEM of its hash tag, or of the whole key), as Redis computes
/// it.
pub fn key_slot(key: &[u8]) -> u16 {
    let tag = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key);
    crc16_xmodem(tag) % SLOTS
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Parses `CLUSTER NODES`.
pub fn parse_nodes(out: &str) -> Vec<NodeInfo> {
    out.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let port = fields[1]
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let flags: Vec<&str> = fields[2].split(',').collect();
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(NodeInfo {
                id: fields[0].to_owned(),
                port,
                master: flags.contains(&"master"),
                failed: flags.contains(&"fail"),
                master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                slots,
            })
        })
        .collect()
}

/// `redis-cli -p PORT ARGS...`, bounded to 10 s; `Err` when it fails or answers an error.
fn cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = run(
        Command::new(redis_cli_binary())
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args),
        Duration::from_secs(10),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() {
        return Err(format!(
            "exit {}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if stdout.starts_with("ERR") || stdout.starts_with("(error)") {
        return Err(stdout);
    }
    Ok(stdout)
}

/// Runs a command to completion, killing it after `limit`.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("redis-cli: {e}. {INSTALL_HINT}"));
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                break;
            }
        }
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("redis-cli output: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag hashes the whole key; the tag ends at the first `}` after the first `{`.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn parses_cluster_nodes() {
        let out = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002,host master - 0 1426238316232 2 connected 5461-10922 [93->-292f]
292f 127.0.0.1:30003@40003 master,fail - 0 1426238318243 3 connected 10923-16383
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460 7
";
        let nodes = parse_nodes(out);
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0].port, 30004);
        assert!(!nodes[0].master);
        assert_eq!(nodes[0].master_id.as_deref(), Some("e7d1"));
        assert_eq!(nodes[1].slots, vec![(5461, 10922)]);
        assert!(nodes[2].failed);
        assert_eq!(nodes[3].slots, vec![(0, 5460), (7, 7)]);
    }
}
