//! Client of berth-agent's framed local protocol (see proto/proto/berth/agent.proto): a
//! blocking unix socket and prost messages, no async runtime or HTTP/2 stack.
use berth_proto::agent::{LocalRequest, LocalResponse, local_error, local_request, local_response};
use prost::Message;
use std::{
    io::{self, Read, Write},
    os::unix::net::UnixStream,
    time::Duration,
};

/// Frame magic shared with the agent.
pub const MAGIC: &[u8; 4] = b"BRT1";
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 4 << 20;

/// How a request failed.
#[derive(Debug)]
pub enum CallError {
    /// The agent could not be reached (not running, socket missing, connection dropped).
    Unreachable(io::Error),
    /// The agent answered with an error.
    Agent(local_error::Code, String),
}

/// A connection to the agent.
pub struct AgentClient {
    stream: UnixStream,
}

impl AgentClient {
    /// Connects to the agent's socket.
    pub fn connect(path: &str, timeout: Duration) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(AgentClient { stream })
    }

    /// Sends one request and waits for its response.
    pub fn call(&mut self, op: local_request::Op) -> Result<local_response::Result, CallError> {
        self.send(op)?;
        self.recv()
    }

    /// Sends one request without waiting: the caller works on while the agent does, then
    /// collects the answer with [`AgentClient::recv`].
    pub fn send(&mut self, op: local_request::Op) -> Result<(), CallError> {
        let req = LocalRequest { op: Some(op) };
        write_frame(&mut self.stream, &req.encode_to_vec()).map_err(CallError::Unreachable)
    }

    /// Waits for the response to the request sent last.
    pub fn recv(&mut self) -> Result<local_response::Result, CallError> {
        let body = read_frame(&mut self.stream).map_err(CallError::Unreachable)?;
        let resp = LocalResponse::decode(body.as_slice())
            .map_err(|e| CallError::Unreachable(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        match resp.result {
            Some(local_response::Result::Error(e)) => Err(CallError::Agent(e.code(), e.message)),
            Some(r) => Ok(r),
            None => Err(CallError::Unreachable(io::Error::new(
                io::ErrorKind::InvalidData,
                "empty response from agent",
            ))),
        }
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(8 + body.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(body);
    w.write_all(&buf)
}

/// Reads one frame.
pub fn read_frame(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head)?;
    if &head[..4] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad frame magic",
        ));
    }
    let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes too large"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}
