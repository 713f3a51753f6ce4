//! Tests of the handshake: a client speaking raw option bytes over an
//! in-memory pipe to `negotiate`, which finds exports through a fake
//! [`ExportLookup`](super::handshake::ExportLookup).

use std::sync::Arc;

use nbd_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio::task::JoinHandle;

use super::handshake::{HandshakeError, MAX_OPTION_LEN, Negotiated, negotiate, transmission_flags};
use super::testutil::{CHUNK, FakeExports, engine_with};
use crate::tls::Tls;

type Outcome = Result<Negotiated, HandshakeError>;

struct Client(DuplexStream);

impl Client {
    async fn option(&mut self, option: u32, data: &[u8]) {
        let len = u32::try_from(data.len()).unwrap();
        self.header(option, len).await;
        self.0.write_all(data).await.unwrap();
    }

    async fn header(&mut self, option: u32, len: u32) {
        let h = OptionHeader {
            option,
            length: len,
        };
        self.0.write_all(&h.encode()).await.unwrap();
    }

    /// One option reply: its option, type and data.
    async fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.0.read_exact(&mut h).await.unwrap();
        let h = OptionReplyHeader::parse(&h).unwrap();
        let mut data = vec![0; h.length as usize];
        self.0.read_exact(&mut data).await.unwrap();
        (h.option, h.reply, data)
    }

    /// Replies up to and including the ACK or error that ends them.
    async fn replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (opt, rep, data) = self.reply().await;
            assert_eq!(opt, option);
            out.push((rep, data));
            if rep == REP_ACK || rep & REP_ERR != 0 {
                return out;
            }
        }
    }

    /// The type of the single reply an option gets.
    async fn only_reply(&mut self, option: u32, data: &[u8]) -> u32 {
        self.option(option, data).await;
        let r = self.replies(option).await;
        assert_eq!(r.len(), 1, "{r:?}");
        r[0].0
    }
}

/// Starts `negotiate` and reads the greeting, then sends `client_flags`.
async fn connect(
    exports: FakeExports,
    tls: Tls,
    client_flags: u32,
) -> (Client, JoinHandle<Outcome>) {
    let exports = Arc::new(exports);
    let (client, mut server) = duplex(1 << 20);
    let task = tokio::spawn(async move { negotiate(&mut server, &*exports, tls).await });
    let mut c = Client(client);
    let mut greeting = [0u8; 18];
    c.0.read_exact(&mut greeting).await.unwrap();
    assert_eq!(greeting, encode_greeting());
    c.0.write_u32(client_flags).await.unwrap();
    (c, task)
}

const FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

fn info(name: &str, requests: &[u16]) -> Vec<u8> {
    InfoRequest {
        name: name.to_owned(),
        requests: requests.to_vec(),
    }
    .encode()
    .unwrap()
}

fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
    MetaRequest {
        name: name.to_owned(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
    }
    .encode()
    .unwrap()
}

async fn failed(task: JoinHandle<Outcome>) -> HandshakeError {
    match task.await.unwrap() {
        Err(e) => e,
        Ok(_) => panic!("the handshake should have failed"),
    }
}

#[tokio::test]
async fn greeting_then_abort_is_acknowledged() {
    let (mut c, task) = connect(FakeExports::default(), Tls::Off, FLAGS).await;
    assert_eq!(c.only_reply(OPT_ABORT, &[]).await, REP_ACK);
    assert!(matches!(task.await.unwrap(), Ok(Negotiated::Closed)));
}

#[tokio::test]
async fn leaving_during_options_is_a_clean_close() {
    let (c, task) = connect(FakeExports::default(), Tls::Off, FLAGS).await;
    drop(c);
    assert!(matches!(task.await.unwrap(), Ok(Negotiated::Closed)));
}

#[tokio::test]
async fn unknown_client_flags_and_bad_option_magic_end_the_handshake() {
    let (_c, task) = connect(FakeExports::default(), Tls::Off, 1 << 5).await;
    assert!(matches!(
        failed(task).await,
        HandshakeError::Proto(ProtoError::ClientFlags(_))
    ));

    let (mut c, task) = connect(FakeExports::default(), Tls::Off, FLAGS).await;
    c.0.write_all(&[0x55; OPTION_HEADER_LEN]).await.unwrap();
    assert!(matches!(
        failed(task).await,
        HandshakeError::Proto(ProtoError::OptionMagic(_))
    ));
}

#[tokio::test]
async fn oversized_options_are_drained_or_refused() {
    let (mut c, task) = connect(FakeExports::default(), Tls::Off, FLAGS).await;
    // Over the limit but drainable: TOO_BIG, and the stream stays aligned.
    let big = vec![0u8; MAX_OPTION_LEN as usize + 1];
    assert_eq!(c.only_reply(OPT_INFO, &big).await, REP_ERR_TOO_BIG);
    assert_eq!(c.only_reply(OPT_ABORT, &[]).await, REP_ACK);
    assert!(matches!(task.await.unwrap(), Ok(Negotiated::Closed)));

    // Too large to drain: the connection ends.
    let (mut c, task) = connect(FakeExports::default(), Tls::Off, FLAGS).await;
    c.header(OPT_INFO, u32::MAX).await;
    assert!(matches!(
        failed(task).await,
        HandshakeError::OptionTooLong { .. }
    ));
}

#[tokio::test]
async fn list_names_every_export() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(dir.path(), &[("b", 1 << 20), ("a", 1 << 20)]).await;
    let (mut c, task) = connect(FakeExports::of(&engine), Tls::Off, FLAGS).await;
    c.option(OPT_LIST, &[]).await;
    let r = c.replies(OPT_LIST).await;
    assert_eq!(
        r,
        [
            (REP_SERVER, rep_server_data("a")),
            (REP_SERVER, rep_server_data("b")),
            (REP_ACK, vec![])
        ]
    );
    assert_eq!(c.only_reply(OPT_LIST, b"x").await, REP_ERR_INVALID);
    assert_eq!(c.only_reply(OPT_ABORT, &[]).await, REP_ACK);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn info_describes_and_go_enters_transmission() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(dir.path(), &[("data", 1 << 20)]).await;
    let (mut c, task) = connect(FakeExports::of(&engine), Tls::Off, FLAGS).await;

    let unknown = info("nope", &[]);
    assert_eq!(c.only_reply(OPT_GO, &unknown).await, REP_ERR_UNKNOWN);
    assert_eq!(c.only_reply(OPT_INFO, &[0, 0]).await, REP_ERR_INVALID);

    c.option(OPT_INFO, &info("data", &[INFO_NAME, INFO_DESCRIPTION]))
        .await;
    let flags = transmission_flags(false, false);
    assert_eq!(
        c.replies(OPT_INFO).await,
        [
            (REP_INFO, info_export(1 << 20, flags)),
            (REP_INFO, info_block_size(1, CHUNK as u32, MAX_PAYLOAD)),
            (REP_INFO, info_string(INFO_NAME, "data")),
            (
                REP_INFO,
                info_string(INFO_DESCRIPTION, "volumed volume data")
            ),
            (REP_ACK, vec![]),
        ]
    );

    c.option(OPT_GO, &info("data", &[])).await;
    let r = c.replies(OPT_GO).await;
    assert_eq!(r.len(), 3, "{r:?}");
    assert_eq!(r[0], (REP_INFO, info_export(1 << 20, flags)));
    let Ok(Negotiated::Export {
        export,
        size,
        options,
        ..
    }) = task.await.unwrap()
    else {
        panic!("GO should enter transmission");
    };
    assert_eq!(export.backend.name(), "data");
    assert_eq!(size, 1 << 20);
    assert_eq!(options, SessionOptions::default());
}

#[tokio::test]
async fn structured_replies_and_base_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(dir.path(), &[("data", 1 << 20)]).await;
    let (mut c, task) = connect(FakeExports::of(&engine), Tls::Off, FLAGS).await;
    let query = meta("data", &[META_BASE_ALLOCATION]);

    // Contexts need structured replies first.
    assert_eq!(
        c.only_reply(OPT_SET_META_CONTEXT, &query).await,
        REP_ERR_INVALID
    );
    assert_eq!(c.only_reply(OPT_STRUCTURED_REPLY, &[]).await, REP_ACK);
    assert_eq!(
        c.only_reply(OPT_SET_META_CONTEXT, &meta("nope", &[])).await,
        REP_ERR_UNKNOWN
    );

    c.option(OPT_LIST_META_CONTEXT, &meta("data", &[])).await;
    assert_eq!(
        c.replies(OPT_LIST_META_CONTEXT).await,
        [
            (REP_META_CONTEXT, meta_context_data(0, META_BASE_ALLOCATION)),
            (REP_ACK, vec![])
        ]
    );
    c.option(OPT_SET_META_CONTEXT, &query).await;
    assert_eq!(
        c.replies(OPT_SET_META_CONTEXT).await,
        [
            (
                REP_META_CONTEXT,
                meta_context_data(META_BASE_ALLOCATION_ID, META_BASE_ALLOCATION)
            ),
            (REP_ACK, vec![])
        ]
    );

    c.option(OPT_GO, &info("data", &[])).await;
    let r = c.replies(OPT_GO).await;
    assert_eq!(
        r[0],
        (
            REP_INFO,
            info_export(1 << 20, transmission_flags(true, false))
        )
    );
    assert_ne!(transmission_flags(true, false) & FLAG_SEND_DF, 0);
    let Ok(Negotiated::Export { options, .. }) = task.await.unwrap() else {
        panic!("GO should enter transmission");
    };
    assert_eq!(
        options,
        SessionOptions {
            structured: true,
            block_status: true,
            read_only: false,
        }
    );
}

#[tokio::test]
async fn export_name_enters_transmission_or_closes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(dir.path(), &[("data", 1 << 20)]).await;
    let (mut c, task) = connect(FakeExports::of(&engine), Tls::Off, FLAGS).await;
    c.option(OPT_EXPORT_NAME, b"data").await;
    let mut reply = [0u8; 10];
    c.0.read_exact(&mut reply).await.unwrap();
    assert_eq!(
        reply[..],
        encode_export_name_reply(1 << 20, transmission_flags(false, false), true)
    );
    assert!(matches!(
        task.await.unwrap(),
        Ok(Negotiated::Export {
            size: 1_048_576,
            ..
        })
    ));

    let (mut c, task) = connect(FakeExports::of(&engine), Tls::Off, FLAGS).await;
    c.option(OPT_EXPORT_NAME, b"nope").await;
    assert!(matches!(
        failed(task).await,
        HandshakeError::UnknownExportName(_)
    ));
}

#[tokio::test]
async fn tls_modes() {
    let (mut c, task) = connect(FakeExports::default(), Tls::Off, FLAGS).await;
    assert_eq!(c.only_reply(OPT_STARTTLS, &[]).await, REP_ERR_POLICY);
    assert_eq!(c.only_reply(999, &[]).await, REP_ERR_UNSUP);
    drop(c);
    task.await.unwrap().unwrap();

    // FORCEDTLS: nothing but STARTTLS and ABORT.
    let (mut c, task) = connect(FakeExports::default(), Tls::Required, FLAGS).await;
    assert_eq!(c.only_reply(OPT_LIST, &[]).await, REP_ERR_TLS_REQD);
    assert_eq!(c.only_reply(OPT_STARTTLS, &[]).await, REP_ACK);
    assert!(matches!(task.await.unwrap(), Ok(Negotiated::StartTls(_))));

    let (_c, task) = connect(FakeExports::default(), Tls::Required, 0).await;
    assert!(matches!(
        failed(task).await,
        HandshakeError::TlsWithoutFixedNewstyle
    ));
}

/// A snapshot export with dirty bitmaps against `snap-a` (and nothing
/// else), through a lookup that answers the bitmap queries.
struct SnapshotExports {
    export: crate::engine::Export,
    diff: Arc<snapshot::diff::Diff>,
}

impl super::handshake::ExportLookup for SnapshotExports {
    fn export(&self, name: &str) -> Option<crate::engine::Export> {
        (name == "snap-b").then(|| self.export.clone())
    }

    fn export_names(&self) -> Vec<String> {
        vec!["snap-b".into()]
    }

    fn changed_since<'a>(
        &'a self,
        _export: &'a crate::engine::Export,
        from: &'a str,
    ) -> super::handshake::BoxFuture<'a, Option<super::handshake::MetaContext>> {
        let d = (from == "snap-a")
            .then(|| super::handshake::MetaContext::Changed(Arc::clone(&self.diff)));
        Box::pin(async move { d })
    }

    fn changed_candidates<'a>(
        &'a self,
        _export: &'a crate::engine::Export,
    ) -> super::handshake::BoxFuture<'a, Vec<String>> {
        Box::pin(async { vec!["snap-a".into()] })
    }
}

fn snapshot_export() -> SnapshotExports {
    use snapshot::{ChunkHash, Manifest, ManifestHeader, Repo, SnapshotId, cache::Fetcher};
    let manifest = |id: &str, chunks: &[(u64, u8)]| {
        let mut m = Manifest::new(ManifestHeader {
            id: SnapshotId::parse(id).unwrap(),
            volume: "v".into(),
            size: 8 * CHUNK,
            chunk_size: CHUNK,
            parent: None,
            created_at: "2026-12-02T00:00:00Z".into(),
            labels: Default::default(),
            changed_chunks: 0,
            logical_bytes: 0,
            uploaded_bytes: 0,
            encryption: None,
        });
        for &(i, b) in chunks {
            m.push(i, Some(ChunkHash::of(&[b])));
        }
        m
    };
    let a = manifest("snap-a", &[(0, 1)]);
    let b = manifest("snap-b", &[(0, 1), (3, 2)]);
    let diff = Arc::new(snapshot::diff::diff(Some(&a), &b).unwrap());
    let store = Arc::new(snapshot::store::MemoryStore::new());
    let repo = Repo::new(store, 3);
    let reader = snapshot::ManifestReader::new(repo.clone(), snapshot::StoredManifest::V1(b));
    let fetcher = Arc::new(Fetcher::new(repo, None));
    let image = crate::engine::SnapshotImage::new(Arc::new(reader), fetcher).unwrap();
    SnapshotExports {
        export: crate::engine::Export::new(crate::engine::Backend::Snapshot(Arc::new(image))),
        diff,
    }
}

/// The context names LIST_META_CONTEXT answers `queries` with on snap-b.
async fn list_contexts(c: &mut Client, queries: &[&str]) -> Vec<String> {
    c.option(OPT_LIST_META_CONTEXT, &meta("snap-b", queries))
        .await;
    c.replies(OPT_LIST_META_CONTEXT)
        .await
        .into_iter()
        .filter(|(rep, _)| *rep == REP_META_CONTEXT)
        .map(|(_, d)| {
            assert_eq!(&d[..4], &[0, 0, 0, 0], "LIST ids are 0");
            String::from_utf8(d[4..].to_vec()).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn snapshot_exports_are_read_only_and_offer_dirty_bitmaps() {
    let exports = Arc::new(snapshot_export());
    let (client, mut server) = duplex(1 << 20);
    let lookup = Arc::clone(&exports);
    let task = tokio::spawn(async move { negotiate(&mut server, &*lookup, Tls::Off).await });
    let mut c = Client(client);
    let mut greeting = [0u8; 18];
    c.0.read_exact(&mut greeting).await.unwrap();
    c.0.write_u32(FLAGS).await.unwrap();
    assert_eq!(c.only_reply(OPT_STRUCTURED_REPLY, &[]).await, REP_ACK);

    assert_eq!(
        list_contexts(&mut c, &[]).await,
        [
            "base:allocation",
            "qemu:dirty-bitmap:snap-a",
            "x-volumed:changed:snap-a"
        ]
    );
    assert_eq!(
        list_contexts(&mut c, &["qemu:"]).await,
        ["qemu:dirty-bitmap:snap-a"]
    );
    assert_eq!(
        list_contexts(&mut c, &["x-volumed:changed:"]).await,
        ["x-volumed:changed:snap-a"]
    );
    assert!(
        list_contexts(&mut c, &["qemu:dirty-bitmap:snap-zz", "other:"])
            .await
            .is_empty()
    );

    // SET: base:allocation keeps its id; bitmaps take the next ones; a
    // namespace query selects nothing, and unknown snapshots are skipped.
    c.option(
        OPT_SET_META_CONTEXT,
        &meta(
            "snap-b",
            &[
                "qemu:dirty-bitmap:snap-a",
                "qemu:dirty-bitmap:",
                "qemu:dirty-bitmap:snap-zz",
                META_BASE_ALLOCATION,
                "x-volumed:changed:snap-a",
            ],
        ),
    )
    .await;
    let set = c.replies(OPT_SET_META_CONTEXT).await;
    assert_eq!(
        set,
        [
            (
                REP_META_CONTEXT,
                meta_context_data(2, "qemu:dirty-bitmap:snap-a")
            ),
            (
                REP_META_CONTEXT,
                meta_context_data(META_BASE_ALLOCATION_ID, META_BASE_ALLOCATION)
            ),
            (
                REP_META_CONTEXT,
                meta_context_data(3, "x-volumed:changed:snap-a")
            ),
            (REP_ACK, vec![])
        ]
    );

    c.option(OPT_GO, &info("snap-b", &[INFO_DESCRIPTION])).await;
    let r = c.replies(OPT_GO).await;
    let flags = transmission_flags(true, true);
    assert_eq!(r[0], (REP_INFO, info_export(8 * CHUNK, flags)));
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(
        flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FUA),
        0
    );
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    let Ok(Negotiated::Export {
        options, contexts, ..
    }) = task.await.unwrap()
    else {
        panic!("GO should enter transmission");
    };
    assert!(options.read_only && options.block_status && options.structured);
    let ids: Vec<u32> = contexts.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [2, META_BASE_ALLOCATION_ID, 3]);
}
