//! A raw NBD client, for tests that send what no well-behaved client would
//! or check replies byte by byte. The bytes are `nbd_proto`'s; what to send
//! is the test's.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use nbd_proto::decode::SimpleReplyHeader;
use nbd_proto::{
    Command, GREETING_LEN, Greeting, INFO_EXPORT, Info, InfoRequest, OPT_GO,
    OPTION_REPLY_HEADER_LEN, OptionReplyHeader, REP_ACK, REP_INFO, Request,
    SIMPLE_REPLY_HEADER_LEN, encode_option,
};

pub struct Raw(pub TcpStream);

impl Raw {
    pub fn connect(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw(s);
        let mut greeting = [0u8; GREETING_LEN];
        r.0.read_exact(&mut greeting).unwrap();
        Greeting::parse(&greeting).expect("a newstyle greeting");
        r
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = Vec::new();
        encode_option(&mut m, opt, data).unwrap();
        self.0.write_all(&m).unwrap();
    }

    /// Reads one option reply: (reply type, data).
    pub fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.0.read_exact(&mut h).unwrap();
        let h = OptionReplyHeader::parse(&h).expect("an option reply");
        let mut data = vec![0u8; h.length as usize];
        self.0.read_exact(&mut data).unwrap();
        (h.reply, data)
    }

    /// Negotiates `name` with NBD_OPT_GO; returns the export size.
    pub fn go(&mut self, name: &str) -> u64 {
        let d = InfoRequest {
            name: name.to_owned(),
            requests: Vec::new(),
        }
        .encode()
        .unwrap();
        self.option(OPT_GO, &d);
        let mut size = 0;
        loop {
            let (typ, data) = self.reply();
            match typ {
                REP_INFO if data[..2] == INFO_EXPORT.to_be_bytes() => {
                    let Ok(Info::Export { size: s, .. }) = Info::parse(&data) else {
                        panic!("bad NBD_INFO_EXPORT: {data:?}");
                    };
                    size = s;
                }
                REP_INFO => {}
                REP_ACK => return size,
                other => panic!(
                    "NBD_OPT_GO failed: {other:#x} {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    /// Sends a request with any type and flags, and its payload.
    pub fn request(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let req = Request {
            flags,
            command: Command::from_wire(typ),
            cookie,
            offset,
            length: len,
        };
        let mut m = req.encode().to_vec();
        m.extend_from_slice(payload);
        self.0.write_all(&m).unwrap();
    }

    /// Reads a simple reply header: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; SIMPLE_REPLY_HEADER_LEN];
        self.0.read_exact(&mut h).unwrap();
        let h = SimpleReplyHeader::parse(&h).expect("a simple reply");
        (h.errno, h.cookie)
    }

    /// True once the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}
