//! The relay under a descriptor limit: clients alone cannot take the descriptors the event
//! source and the metrics page need.

mod relay_common;

use std::io::Write;

use relay_common::{
    client, closed_by_server, connect, free_port, get_metrics, read_until, wait_for_sample,
};
use relay_common::{RelayProcess, PATIENCE};

#[test]
fn clients_past_the_descriptor_limit_are_refused_and_the_source_and_metrics_still_work() {
    // 128 descriptors: the default cap leaves 64 for the source, listeners, metrics, files.
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let relay = RelayProcess::start(&["--metrics-addr", &metrics_addr], Some(128));
    let cap = 64;
    let attempts = 300;
    // Accepted in the order they connect, so the first `cap` are the ones let in.
    let mut clients: Vec<_> = (1..=attempts)
        .map(|user| client(relay.clients, user))
        .collect();
    for (index, refused) in clients.iter_mut().enumerate().skip(cap) {
        assert!(
            closed_by_server(refused),
            "client {} of {attempts} was neither served nor closed within {PATIENCE:?}",
            index + 1
        );
    }
    wait_for_sample(metrics_port, "weir_relay_clients_connected", cap as u64);
    let mut source = connect(relay.events);
    source.write_all(b"1|B\n").unwrap();
    for admitted in &mut clients[..cap] {
        assert_eq!(read_until(admitted, "1|B"), "1|B\n");
    }
    let page = get_metrics(metrics_port);
    let refused = attempts as usize - cap;
    assert!(
        page.contains(&format!("\nweir_relay_clients_refused_total {refused}\n")),
        "{page}"
    );
    assert!(
        page.contains(&format!("\nweir_relay_clients_connected {cap}\n")),
        "{page}"
    );
    relay.stop();
}
