//! `vol status`: the daemon's settings and counters, a table or JSON.

use volumed_api::Status;

use crate::client::Client;
use crate::output::Out;

pub async fn status(client: &Client, out: &Out) -> anyhow::Result<()> {
    let st: Status = client.get("/v1/status").await?;
    if out.json {
        return Ok(out.json(&st)?);
    }
    out.fields(&[
        ("version", st.version),
        ("data dir", st.data_dir),
        ("control socket", client.socket().display().to_string()),
        ("nbd listen", st.nbd_listen),
        ("nbd socket", st.nbd_socket),
        ("nbd tls", st.nbd_tls),
        (
            "store",
            if st.store_encrypted {
                format!("{} (encrypted)", st.store)
            } else {
                st.store
            },
        ),
        ("volumes", st.volumes.to_string()),
        ("io backend", st.io_backend),
        ("image tools", st.image_tools),
        (
            "failing policies",
            if st.failing_policies.is_empty() {
                "-".into()
            } else {
                st.failing_policies.join(", ")
            },
        ),
    ])?;
    Ok(())
}
