//! Placeholder: the server lands in the next change.
use tokio::net::TcpListener;

use crate::config::RelayConfig;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

pub struct Listeners {
    pub events: TcpListener,
    pub clients: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &RelayConfig) -> Result<Listeners, RelayError> {
        let events_addr =
            std::net::SocketAddr::new(config.bind_address, config.event_listener_port);
        let clients_addr =
            std::net::SocketAddr::new(config.bind_address, config.client_listener_port);
        let events = TcpListener::bind(events_addr)
            .await
            .map_err(|source| RelayError::Bind {
                what: "the event source port",
                addr: events_addr,
                source,
            })?;
        let clients = TcpListener::bind(clients_addr)
            .await
            .map_err(|source| RelayError::Bind {
                what: "the user client port",
                addr: clients_addr,
                source,
            })?;
        Ok(Listeners { events, clients })
    }
}

pub async fn run(
    _listeners: Listeners,
    _config: RelayConfig,
    shutdown: weir_runtime::Shutdown,
) -> Result<(), RelayError> {
    shutdown.token.cancelled().await;
    Ok(())
}
