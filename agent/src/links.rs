//! Background deletion of pods' host-side interfaces (async edge, rtnetlink).
//!
//! DEL releases the endpoint synchronously and queues the interface here: deleting a veth waits
//! for an RCU grace period in the kernel (tens of milliseconds on a busy node), which the container
//! runtime then does not wait for. Deletion is by ifindex, so an interface of the same name created
//! by a later ADD is never touched. If the agent dies before deleting, the plugin's GC removes
//! the leftover (every `bth*` interface not in the runtime's valid attachments).
use tokio::sync::mpsc::UnboundedReceiver;

/// Deletes queued `(name, ifindex)` interfaces until the sender side is dropped.
pub async fn delete_links(mut rx: UnboundedReceiver<(String, u32)>) {
    let (conn, handle, _) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot open netlink; interfaces of deleted pods are left for GC");
            return;
        }
    };
    tokio::spawn(conn);
    while let Some((name, index)) = rx.recv().await {
        let started = std::time::Instant::now();
        match handle.link().del(index).execute().await {
            Ok(()) => {
                tracing::debug!(ifname = %name, index, elapsed = ?started.elapsed(), "host interface deleted")
            }
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                tracing::debug!(ifname = %name, index, "host interface already gone")
            }
            Err(e) => {
                tracing::warn!(ifname = %name, index, error = %e, "deleting host interface failed")
            }
        }
    }
}
