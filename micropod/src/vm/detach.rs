//! `network detach` of an endpoint a VM may own: refused while the VM runs (it would run on
//! without a network, and its address would go to the next endpoint), unless forced; forced,
//! the VM's record says its network was detached. Here rather than in `network`, which knows
//! endpoints, not the VMs above it: the VM records name their endpoint, as the metrics' `vm`
//! label does.

use super::{LazyRuntime, VmError, VmRecord, VmState, Vms, record};
use crate::{network::Released, state::StateLock};

/// What [`Vms::detach_endpoint`] did.
#[derive(Clone, Debug)]
pub struct EndpointDetached {
    /// The endpoint was gone already (its link or namespace), and was released.
    pub gone: Option<Released>,
    /// The running VM it was taken from (`--force`).
    pub vm: Option<String>,
}

impl Vms {
    /// `network detach`: detaches `endpoint`; refuses if it is the network of a VM that is
    /// starting or running, unless `force`, which marks the VM's record. Holds the VM lock
    /// throughout, so the VM's supervisor cannot release the endpoint meanwhile.
    pub fn detach_endpoint(
        &self,
        endpoint: &str,
        force: bool,
    ) -> Result<EndpointDetached, VmError> {
        let mut rt = LazyRuntime::default();
        let mut detach = || {
            rt.block_on(self.network.detach(endpoint))?
                .map_err(VmError::Detach)
        };
        if !self.state.root().exists() {
            // No VM was ever run here.
            return Ok(EndpointDetached {
                gone: detach()?,
                vm: None,
            });
        }
        let lock = self.state.lock()?;
        // A VM that is gone releases its endpoint here, as in every VM command.
        if let Err(e) = self.reconcile_locked(&lock) {
            log::warn!("cannot reconcile VM records: {e}");
        }
        let Some(mut rec) = self.owner_of(&lock, endpoint)? else {
            return Ok(EndpointDetached {
                gone: detach()?,
                vm: None,
            });
        };
        if !force {
            return Err(VmError::EndpointInUse {
                endpoint: endpoint.to_owned(),
                vm: rec.name,
                state: rec.state,
            });
        }
        let gone = detach()?;
        rec.network.released = true;
        rec.network.detached_at = Some(record::now());
        self.write(&lock, &rec)?;
        log::warn!(
            "VM {} runs on without a network: its endpoint {endpoint} was detached",
            rec.name
        );
        Ok(EndpointDetached {
            gone,
            vm: Some(rec.name),
        })
    }

    /// The VM not yet exited whose endpoint `endpoint` is (same name and TAP as on record),
    /// after a reconcile (so its supervisor, VMM or `run` is alive). Call with the VM lock.
    fn owner_of(&self, lock: &StateLock, endpoint: &str) -> Result<Option<VmRecord>, VmError> {
        let Some(ep) = self
            .network
            .list()
            .map_err(VmError::Detach)?
            .into_iter()
            .find(|ep| ep.name == endpoint)
        else {
            return Ok(None);
        };
        Ok(self.read_all(Some(lock))?.into_iter().find(|r| {
            r.state != VmState::Exited
                && !r.network.released
                && r.network.endpoint == endpoint
                && r.network.tap == ep.link
        }))
    }
}
