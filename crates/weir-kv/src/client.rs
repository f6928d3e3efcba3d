//! `weir kv client`: requests over the broker, one reply awaited per request.
//!
//! [`Requester`] is the request-reply half every tool here shares (the client, the load tool,
//! the tests): one connection, a private reply queue (server-named, exclusive, auto-delete,
//! or RabbitMQ's direct reply-to), and a correlation id per request so a late reply to an
//! earlier request is never taken for the current one.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio_util::sync::CancellationToken;

/// RabbitMQ's pseudo-queue for replies without declaring a queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("the reply consumer closed")]
    RepliesClosed,
    #[error("--input {path}: {problem}")]
    Input { path: PathBuf, problem: String },
    #[error("interrupted")]
    Interrupted,
}

/// Where replies come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplyQueue {
    /// A server-named exclusive, auto-delete queue of this client's own.
    Private,
    /// `amq.rabbitmq.reply-to`: no queue at all, replies straight to this channel.
    Direct,
}

/// One client: sends requests to the kv queue and awaits each reply in turn.
pub struct Requester {
    connection: Connection,
    channel: Channel,
    queue: ShortString,
    reply_to: ShortString,
    replies: Consumer,
    next_id: u64,
    id_prefix: String,
}

impl Requester {
    pub async fn connect(
        amqp_url: &str,
        queue: &str,
        reply_queue: ReplyQueue,
    ) -> Result<Self, ClientError> {
        let properties =
            ConnectionProperties::default().with_connection_name("weir-kv-client".into());
        let connection = Connection::connect(amqp_url, properties).await?;
        let channel = connection.create_channel().await?;
        // Declared as the server declares it, so requests sent before the server's first
        // start wait in the queue instead of being dropped by the broker as unroutable.
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.into(), durable, FieldTable::default())
            .await?;
        let reply_to: ShortString = match reply_queue {
            ReplyQueue::Direct => DIRECT_REPLY_TO.into(),
            ReplyQueue::Private => {
                let private = QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                };
                let declared = channel
                    .queue_declare("".into(), private, FieldTable::default())
                    .await?;
                declared.name().clone()
            }
        };
        // Replies are consumed without acknowledgements: direct reply-to demands it, and a
        // reply lost with this client has nobody left to read it anyway.
        let options = BasicConsumeOptions {
            no_ack: true,
            exclusive: true,
            ..BasicConsumeOptions::default()
        };
        let replies = channel
            .basic_consume(reply_to.clone(), "".into(), options, FieldTable::default())
            .await?;
        let id_prefix = format!("{}-{}", std::process::id(), reply_to.as_str());
        Ok(Requester {
            connection,
            channel,
            queue: queue.into(),
            reply_to,
            replies,
            next_id: 0,
            id_prefix,
        })
    }

    /// Sends `body` as one request and returns the body of its reply.
    pub async fn call(&mut self, body: &[u8], timeout: Duration) -> Result<Vec<u8>, ClientError> {
        self.next_id += 1;
        let correlation_id = format!("{}-{}", self.id_prefix, self.next_id);
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(correlation_id.as_str().into())
            .with_reply_to(self.reply_to.clone());
        self.channel
            .basic_publish(
                "".into(),
                self.queue.clone(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?;
        let wait = async {
            loop {
                let delivery = self
                    .replies
                    .next()
                    .await
                    .ok_or(ClientError::RepliesClosed)??;
                let matches = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .is_some_and(|id| id.as_str() == correlation_id);
                // A reply to an earlier request that timed out is dropped here.
                if matches {
                    return Ok(delivery.data);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Flags of `weir kv client`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientFlags {
    /// The seed's input.json: a JSON array of requests, sent in order.
    #[arg(long)]
    pub input: PathBuf,
    /// RabbitMQ [env: AMQP_URL or QUEUE_CONN_STRING; default: amqp://127.0.0.1:5672/%2f].
    #[arg(long)]
    pub amqp_url: Option<String>,
    /// Request queue [env: QUEUE_NAME; default: weir.kv].
    #[arg(long)]
    pub queue: Option<String>,
    /// Seconds to wait for each reply before giving up (non-zero exit).
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    /// Where replies come back: a private queue, or RabbitMQ's direct reply-to.
    #[arg(long, value_enum, default_value_t = ReplyQueue::Private)]
    pub reply_queue: ReplyQueue,
}

/// The broker URL and queue as `weir kv serve` would resolve them from the environment.
pub fn resolve_target(amqp_url: Option<String>, queue: Option<String>) -> (String, String) {
    let defaults = crate::config::KvConfig::default();
    let url = amqp_url
        .or_else(|| std::env::var("AMQP_URL").ok())
        .or_else(|| std::env::var("QUEUE_CONN_STRING").ok())
        .unwrap_or(defaults.amqp_url);
    let queue = queue
        .or_else(|| std::env::var("QUEUE_NAME").ok())
        .unwrap_or(defaults.queue);
    (url, queue)
}

/// Runs the input file in order, printing each reply as one JSON line. `Ok(false)` when some
/// reply said `"ok": false`; an error on a timeout or a broker failure.
pub async fn run(flags: ClientFlags, token: CancellationToken) -> Result<bool, ClientError> {
    let requests = read_input(&flags.input)?;
    if flags.timeout_secs == 0 {
        return Err(ClientError::Input {
            path: flags.input,
            problem: "--timeout-secs must be at least 1".into(),
        });
    }
    let timeout = Duration::from_secs(flags.timeout_secs);
    let (url, queue) = resolve_target(flags.amqp_url, flags.queue);
    let mut requester = Requester::connect(&url, &queue, flags.reply_queue).await?;
    let mut all_ok = true;
    for request in requests {
        let reply = tokio::select! {
            reply = requester.call(&request, timeout) => reply?,
            _ = token.cancelled() => return Err(ClientError::Interrupted),
        };
        all_ok &= reply_is_ok(&reply);
        println!("{}", String::from_utf8_lossy(&reply));
    }
    requester.close().await;
    Ok(all_ok)
}

/// Each element of the array, re-encoded as it was written (the server judges it, not us).
fn read_input(path: &PathBuf) -> Result<Vec<Vec<u8>>, ClientError> {
    let problem = |problem: String| ClientError::Input {
        path: path.clone(),
        problem,
    };
    let text = std::fs::read(path).map_err(|err| problem(err.to_string()))?;
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&text).map_err(|err| problem(format!("not a JSON array: {err}")))?;
    rows.iter()
        .map(|row| serde_json::to_vec(row).map_err(|err| problem(err.to_string())))
        .collect()
}

pub fn reply_is_ok(reply: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(reply)
        .ok()
        .and_then(|value| value.get("ok").and_then(serde_json::Value::as_bool))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_ok_only_when_it_says_so() {
        assert!(reply_is_ok(br#"{"ok": true, "found": false}"#));
        assert!(!reply_is_ok(br#"{"ok": false, "error": "x"}"#));
        assert!(!reply_is_ok(b"not json"));
        assert!(!reply_is_ok(br#"{"found": true}"#));
    }

    #[test]
    fn the_input_file_is_a_json_array_of_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.json");
        std::fs::write(
            &path,
            r#"[{"action": "add","key": "O","value": "o"}, {"action": "getall"}]"#,
        )
        .unwrap();
        let rows = read_input(&path).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1], br#"{"action":"getall"}"#);

        std::fs::write(&path, r#"{"action": "getall"}"#).unwrap();
        assert!(read_input(&path)
            .unwrap_err()
            .to_string()
            .contains("not a JSON array"));
    }
}
