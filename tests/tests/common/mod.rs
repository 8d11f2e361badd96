//! Helpers shared by the tokio-postgres test files.

use tokio_postgres::{Client, NoTls};

/// Connects and drives the connection in the background.
pub async fn connect(dsn: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {dsn}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}
