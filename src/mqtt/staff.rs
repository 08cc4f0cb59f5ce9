//! Staff integrators over MQTT: they read every device's events and status through a router
//! link of their own (rumqttd does routing, QoS and retained messages for them), may subscribe
//! to nothing else and publish nothing.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use rumqttd::{
    protocol::{ConnectReturnCode, Packet, PingResp, SubAck, Subscribe},
    Notification,
};

use super::{
    codec::{Conn, ConnError},
    edge::{forbidden, Edge},
};
use crate::{
    domain::{auth, users},
    error::Error,
};

/// Checks a staff login through the same domain functions as the staff API: the username with
/// its password (attempts counted by the login limits), or with one of its JWTs or API tokens
/// as the password. Any active account may connect, since all it can do is read; a deactivated
/// one is refused as not authorised, a wrong password as bad credentials.
pub async fn authenticate(
    edge: &Arc<Edge>,
    peer: IpAddr,
    username: &str,
    password: &str,
) -> Result<String, ConnectReturnCode> {
    // Not a user name at all (a MAC-style device id with a wrong token, say): refused without
    // counting against anyone's login budget.
    if users::validate_username(username).is_err() {
        return Err(ConnectReturnCode::BadUserNamePassword);
    }
    let state = edge.state.clone();
    let (username, password) = (username.to_owned(), password.to_owned());
    let checked = edge
        .main
        .spawn(async move {
            if !auth::is_bearer_credential(&password) {
                state.login_limits.check(peer, &username)?;
            }
            auth::authenticate_login(&state.db, &state.auth, &username, &password).await
        })
        .await
        .map_err(|_| ConnectReturnCode::ServerUnavailable)?;
    match checked {
        Ok(principal) => Ok(principal.user.username),
        Err(err) => Err(match err {
            Error::Unauthenticated {
                code: "user_inactive",
                ..
            } => ConnectReturnCode::NotAuthorized,
            Error::Unauthenticated { .. } | Error::InvalidToken | Error::MissingToken => {
                ConnectReturnCode::BadUserNamePassword
            }
            Error::RateLimited { .. } => ConnectReturnCode::ConnectionRateExceeded,
            err => {
                tracing::warn!(error = %err, "MQTT staff authentication failed");
                ConnectReturnCode::ServerUnavailable
            }
        }),
    }
}

pub async fn serve(
    edge: &Arc<Edge>,
    mut conn: Conn,
    client_id: &str,
    user: &str,
    keep_alive: Duration,
) -> Result<(), ConnError> {
    let id = format!("staff-{client_id}");
    let link_edge = edge.clone();
    let linked = tokio::task::spawn_blocking(move || link_edge.link(&id)).await;
    let Ok(Ok((mut link_tx, mut link_rx, _connack))) = linked else {
        tracing::warn!(user, "cannot open a router link for a staff connection");
        return Ok(());
    };
    // Subscribe packet id → for each original filter, its index in what the router got.
    let mut partial: HashMap<u16, Vec<Option<usize>>> = HashMap::new();
    let mut stop = edge.stopped();
    let outcome = loop {
        tokio::select! {
            read = conn.read_packet(keep_alive) => {
                let packet = match read {
                    Ok(p) => p,
                    Err(err) => break Err(err),
                };
                match packet {
                    Packet::Publish(publish, _) => {
                        tracing::warn!(
                            user,
                            topic = %String::from_utf8_lossy(&publish.topic),
                            "staff connections may not publish; disconnecting"
                        );
                        break Ok(());
                    }
                    Packet::Subscribe(subscribe, props) => {
                        let mut allowed = Vec::new();
                        let positions: Vec<Option<usize>> = subscribe
                            .filters
                            .iter()
                            .map(|f| {
                                edge.topics.staff_subscribe(&f.path).then(|| {
                                    allowed.push(f.clone());
                                    allowed.len() - 1
                                })
                            })
                            .collect();
                        if allowed.is_empty() {
                            conn.send(Packet::SubAck(
                                SubAck {
                                    pkid: subscribe.pkid,
                                    return_codes: vec![forbidden(conn.version); positions.len()],
                                },
                                None,
                            ))
                            .await?;
                            continue;
                        }
                        if allowed.len() < positions.len() {
                            partial.insert(subscribe.pkid, positions);
                        }
                        let subscribe = Subscribe { pkid: subscribe.pkid, filters: allowed };
                        if link_tx.send(Packet::Subscribe(subscribe, props)).await.is_err() {
                            break Ok(());
                        }
                    }
                    Packet::PingReq(_) => conn.send(Packet::PingResp(PingResp)).await?,
                    Packet::Disconnect(..) => break Ok(()),
                    Packet::Connect(..) => break Ok(()),
                    other => {
                        if link_tx.send(other).await.is_err() {
                            break Ok(());
                        }
                    }
                }
            }
            notification = link_rx.next() => {
                let notification = match notification {
                    Ok(Some(n)) => n,
                    Ok(None) => continue,
                    Err(_) => break Ok(()),
                };
                if let Notification::Unschedule = notification {
                    if link_rx.wake().await.is_err() {
                        break Ok(());
                    }
                    continue;
                }
                let packet: Option<Packet> = notification.into();
                let Some(mut packet) = packet else { continue };
                if let Packet::SubAck(ack, _) = &mut packet {
                    if let Some(positions) = partial.remove(&ack.pkid) {
                        let granted = std::mem::take(&mut ack.return_codes);
                        ack.return_codes = positions
                            .iter()
                            .map(|p| match p {
                                Some(i) => granted.get(*i).cloned().unwrap_or(forbidden(conn.version)),
                                None => forbidden(conn.version),
                            })
                            .collect();
                    }
                }
                let disconnect = matches!(packet, Packet::Disconnect(..));
                conn.send(packet).await?;
                if disconnect {
                    break Ok(());
                }
            }
            _ = stop.changed() => break Ok(()),
        }
    };
    // Tells the router the connection is gone (it has no other way to learn it).
    let _ = link_tx
        .send(Packet::Disconnect(
            rumqttd::protocol::Disconnect {
                reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
            },
            None,
        ))
        .await;
    conn.shutdown().await;
    outcome
}
