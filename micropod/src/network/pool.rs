//! The TAP pool: TAPs made ahead of need, so that attaching a VM's endpoint does not wait for
//! the kernel to register a device, set up its qdisc and filters and add a port to a bridge
//! with hundreds of ports (`br_add_if` walks all of them several times).
//!
//! A pooled TAP (`mpp<network><serial>`, see [`pool_link_name`]) is complete before it is
//! recorded under `pool/`: created, hooked with the port programs (eBPF data path), a port of
//! the bridge, and down, so it passes no frame. An attach takes one (the record goes first,
//! then one request renames it, which the kernel allows only on a down link, and brings it
//! up, after the maps are filled for its address: the counters see its first frame). A TAP
//! has never carried a frame when it is taken, and is never given back: a detach retires it
//! like any other link, so no tenant's MAC, queued frames, counters or NAT flows can reach the
//! next one.
//!
//! The refill (`micropod network refill`, started in the background by the CLI after `up` and
//! after an attach that took the pool down to half its size, or run inline by library users)
//! holds a lock of its own and the state lock only to record each TAP. A refill killed half
//! way leaves an unrecorded `mpp…` link of our subnet, which `gc` deletes (when no refill
//! runs) and `down` deletes with the rest.

use std::{
    fs::OpenOptions,
    path::Path,
    process::{Command, Stdio},
};

use super::{NetworkError, model::*};
use crate::{
    datapath::{DataPlane, PortSpec},
    failpoint,
    net::{
        Netlink,
        link::{self, IndexProbe},
        tap,
    },
    state::StateLock,
};

/// The hidden CLI subcommand that runs a refill: `micropod network refill`.
pub const REFILL_COMMAND: &str = "refill";

impl super::Network {
    /// `micropod network refill`: makes spare state files, then pooled TAPs until the pool
    /// holds what `network up --pool` asked for. One refill at a time (its own lock);
    /// returns at once if another runs or no network is up. Returns how many TAPs it made.
    pub async fn refill(&self) -> Result<usize, NetworkError> {
        let Some(_refill) = self.state.try_lock_file(REFILL_LOCK)? else {
            return Ok(0);
        };
        let nl = Netlink::connect().map_err(NetworkError::Netlink)?;
        let probe = IndexProbe::new().map_err(NetworkError::Probe)?;
        // Spares first: they are cheap, and every attach writes records, pooled or not.
        if let Some(head) = self.records.head_unlocked()?
            && head.phase == Phase::Ready
        {
            let spares = self.state.make_spares(spare_target(head.config.pool))?;
            log::debug!("refill made {spares} spare state file(s)");
        }
        let mut made = 0;
        loop {
            let Some(head) = self.records.head_unlocked()? else {
                return Ok(made);
            };
            let have = self.records.pool_names()?.len();
            if head.phase != Phase::Ready || have >= head.config.pool as usize {
                return Ok(made);
            }
            let Some(bridge_index) = probe
                .index(&head.config.bridge)
                .map_err(NetworkError::Probe)?
            else {
                return Ok(made);
            };
            let name = self.next_pool_name(&head, &probe)?;
            let hooked = head.active_datapath == ActiveDatapath::Ebpf;
            if let Err(e) = self
                .make_pooled(
                    &nl,
                    &probe,
                    &name,
                    (bridge_index, head.config.subnet.network()),
                    hooked,
                )
                .await
            {
                let _ = link::delete_if_exists(&nl, &name).await;
                return Err(e);
            }
            failpoint::hit("refill:made");
            // Recorded under the lock, if the network it was made for is still the one up.
            let Some(lock) = self.state.lock_existing()? else {
                let _ = link::delete_if_exists(&nl, &name).await;
                return Ok(made);
            };
            match self.records.head(&lock)? {
                Some(now)
                    if now.phase == Phase::Ready
                        && now.config.bridge == head.config.bridge
                        && now.config.subnet == head.config.subnet
                        && now.active_datapath == head.active_datapath =>
                {
                    self.records
                        .add_pooled(&lock, &PooledTap { name, hooked })?;
                }
                _ => {
                    drop(lock);
                    let _ = link::delete_if_exists(&nl, &name).await;
                    return Ok(made);
                }
            }
            drop(lock);
            failpoint::hit("refill:recorded");
            made += 1;
        }
    }

    /// A pooled TAP's name that neither the records nor the kernel use.
    fn next_pool_name(
        &self,
        head: &NetworkHead,
        probe: &IndexProbe,
    ) -> Result<String, NetworkError> {
        let network = head.config.subnet.network();
        for serial in 0..=u16::MAX {
            let name = pool_link_name(network, serial);
            if !self.records.is_pooled(&name)?
                && probe.index(&name).map_err(NetworkError::Probe)?.is_none()
            {
                return Ok(name);
            }
        }
        Err(NetworkError::PoolNamesExhausted)
    }

    /// Creates the TAP `name`, hooks it if `hooked`, and makes it a (down) port of the bridge,
    /// in the network's pool group.
    async fn make_pooled(
        &self,
        nl: &Netlink,
        probe: &IndexProbe,
        name: &str,
        (bridge_index, network): (u32, std::net::Ipv4Addr),
        hooked: bool,
    ) -> Result<(), NetworkError> {
        let pool_err = |step: &'static str, source: Box<dyn std::error::Error + Send + Sync>| {
            NetworkError::Pool {
                name: name.to_owned(),
                step,
                source,
            }
        };
        tap::create_persistent(name, None).map_err(|e| pool_err("create the TAP", Box::new(e)))?;
        failpoint::hit("refill:created");
        crate::net::sysctl::disable_ipv6(name)
            .map_err(|e| pool_err("turn IPv6 off on the port", Box::new(e)))?;
        if hooked {
            let ifindex = probe
                .index(name)
                .map_err(NetworkError::Probe)?
                .ok_or_else(|| pool_err("find the TAP", "it vanished".into()))?;
            DataPlane::new(&self.bpf_dir)
                .hook_port(
                    nl,
                    &PortSpec {
                        ip: std::net::Ipv4Addr::UNSPECIFIED,
                        mac: [0; 6],
                        port: name,
                        ifindex,
                    },
                )
                .await
                .map_err(|e| pool_err("hook the port programs", Box::new(e)))?;
        }
        link::set_controller(nl, name, bridge_index, pool_group(network))
            .await
            .map_err(|e| pool_err("put it on the bridge", Box::new(e)))?;
        Ok(())
    }

    /// For an attach of `ep` (a TAP) under the lock: takes a pooled TAP if one is usable and
    /// returns whether it did (it is then the endpoint's link, hooked, on the bridge and up).
    /// The record goes first, so a crash leaves an unrecorded pool link (for `gc`) or the
    /// endpoint's link (for the attach intent), never a record of a taken TAP.
    pub(super) async fn take_pooled(
        &self,
        nl: &Netlink,
        lock: &StateLock,
        head: &NetworkHead,
        ep: &Endpoint,
        bridge_index: u32,
    ) -> Result<bool, NetworkError> {
        let probe = IndexProbe::new().map_err(NetworkError::Probe)?;
        let ebpf = head.active_datapath == ActiveDatapath::Ebpf;
        for name in self.records.pool_names()? {
            let pooled = self.records.pooled(&name)?;
            self.records.remove_pooled(lock, &name)?;
            failpoint::hit("attach:taken-from-pool");
            let Some(pooled) = pooled else { continue };
            let Some(ifindex) = probe.index(&name).map_err(NetworkError::Probe)? else {
                continue;
            };
            if ebpf {
                let plane = DataPlane::new(&self.bpf_dir);
                let spec = super::datapath::port_spec(ep, ifindex);
                let ready = match plane.register_port(&spec) {
                    Ok(()) if pooled.hooked => Ok(()),
                    Ok(()) => plane.hook_port(nl, &spec).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = ready {
                    log::warn!(
                        "cannot use pooled {name}: {}; making a TAP",
                        crate::error_chain(&e)
                    );
                    let _ = link::delete_if_exists(nl, &name).await;
                    return Ok(false);
                }
            }
            match link::adopt(nl, &name, ifindex, &ep.link, bridge_index).await {
                Ok(()) => {
                    failpoint::hit("attach:link-created");
                    return Ok(true);
                }
                Err(e) if e.is_bridge_full() => {
                    let _ = link::delete_if_exists(nl, &name).await;
                    return Err(super::AttachError::BridgeFull.into());
                }
                Err(e) => {
                    log::warn!(
                        "cannot use pooled {name}: {}; making a TAP",
                        crate::error_chain(&e)
                    );
                    let _ = link::delete_if_exists(nl, &name).await;
                    return Ok(false);
                }
            }
        }
        Ok(false)
    }

    /// After a command that left the pool below its size, with the state lock released:
    /// starts a background refill (unless one runs), or refills inline. Failures are logged.
    pub(super) async fn refill_later(&self) {
        match &self.reaper_exe {
            Some(exe) => {
                // A refill that runs will see the new need itself.
                match self.state.try_lock_file(REFILL_LOCK) {
                    Ok(Some(free)) => drop(free),
                    _ => return,
                }
                if let Err(e) = self.spawn_job(exe, REFILL_COMMAND, REFILL_LOG) {
                    log::warn!("cannot start the pool refill {}: {e}", exe.display());
                }
            }
            None => {
                if let Err(e) = self.refill().await {
                    log::warn!("cannot refill the TAP pool: {}", crate::error_chain(&e));
                }
            }
        }
    }

    /// `exe --state-dir S --bpf-dir B network <command>`, detached: a session of its own,
    /// stderr on `<state>/<log>` (so it holds none of the caller's pipes). Not waited for by
    /// the command, which returns at once; a thread collects it in a process that lives on.
    pub(super) fn spawn_job(&self, exe: &Path, command: &str, log: &str) -> std::io::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.root().join(log))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let mut cmd = Command::new(exe);
        cmd.arg("--state-dir")
            .arg(self.state.root())
            .arg("--bpf-dir")
            .arg(&self.bpf_dir)
            .args(["network", command])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        crate::sys::setsid_on_exec(&mut cmd);
        let mut child = cmd.spawn()?;
        std::thread::spawn(move || child.wait());
        Ok(())
    }
}
