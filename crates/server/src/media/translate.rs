//! Between the spaces-web messages and the SFU's API: a client's media message becomes an
//! SFU call (and maybe a direct reply), an SFU event becomes a [`MediaEvent`]. Everything
//! is emitted in the order it was made: a subscriber hears `add_track` (through the space)
//! before the `sub_offer` that carries the track.

use std::sync::Arc;
use std::time::Instant;

use spacegate_proto::signaling::{
    ClientMessage, ConnectionTracks, ConnectionsRequest, Envelope, ErrorBody, RequestErrorType,
    ServerMessage, SfuDescription, SpeakingTrack, SubscriptionReply, TrackKind,
};
use spacegate_proto::{ConnectionId, SpaceId};
use spacegate_sfu::{Sfu, SfuEvent};

use super::{Command, MediaEvent, MediaEvents};

fn frame(m: ServerMessage) -> Arc<str> {
    Envelope::new(m).to_json().into()
}

fn error(message: impl Into<String>) -> Arc<str> {
    frame(ServerMessage::Error(ErrorBody::request(
        RequestErrorType::Unknown,
        message,
        None,
    )))
}

pub(super) fn command(sfu: &mut Sfu, sink: &dyn MediaEvents, c: Command) {
    let now = Instant::now();
    match c {
        Command::Join {
            room,
            member,
            mode,
            answered_initial_offer: false,
        } => sfu.join(room.as_str(), member.as_str(), mode, now),
        Command::Join {
            room,
            member,
            mode,
            answered_initial_offer: true,
        } => sfu.join_stable(room.as_str(), member.as_str(), mode, now),
        Command::Leave { member } => sfu.leave(member.as_str(), now),
        Command::Stats(tx) => {
            let _ = tx.send(sfu.stats());
        }
        Command::Crash => panic!("media plane crash requested"),
        Command::Message { member, message } => {
            tracing::trace!(%member, kind = super::message_kind(&message), "media message");
            if let Some(frame) = message_in(sfu, sink.sfu_id(), &member, message, now) {
                tracing::trace!(%member, len = frame.len(), "media reply");
                sink.media_event(MediaEvent::Frame { to: member, frame });
            }
        }
    }
}

/// One media message from a client; returns the direct reply, if any.
fn message_in(
    sfu: &mut Sfu,
    sfu_id: &str,
    member: &ConnectionId,
    message: ClientMessage,
    now: Instant,
) -> Option<Arc<str>> {
    let m = member.as_str();
    match message {
        ClientMessage::PendingTrack(p) => {
            let kind = match p.kind {
                TrackKind::Audio => spacegate_sfu::TrackKind::Audio,
                TrackKind::Video => spacegate_sfu::TrackKind::Video,
            };
            sfu.pending_track(m, &p.mid, &p.tid, kind, p.muted);
            None
        }
        ClientMessage::Offer(sdp) => Some(match sfu.offer(m, &sdp, now) {
            Ok(answer) => frame(ServerMessage::Answer(answer)),
            Err(e) => error(format!("offer refused: {e}")),
        }),
        ClientMessage::SubAnswer(d) if d.sfu_id != sfu_id => {
            Some(error(format!("unknown sfu_id {:?}", d.sfu_id)))
        }
        ClientMessage::SubAnswer(d) => sfu
            .sub_answer(m, &d.sdp, now)
            .err()
            .map(|e| error(format!("sub_answer refused: {e}"))),
        ClientMessage::Candidate(c) if c.sfu_id != sfu_id => {
            Some(error(format!("unknown sfu_id {:?}", c.sfu_id)))
        }
        // ICE-lite needs no client candidates; a malformed one still gets a clear error.
        ClientMessage::Candidate(c) => sfu
            .candidate(m, &c.candidate.candidate)
            .err()
            .map(|e| error(format!("candidate refused: {e}"))),
        ClientMessage::MuteTrack(tid) => {
            sfu.set_muted(m, &tid, true, now);
            None
        }
        ClientMessage::UnmuteTrack(tid) => {
            sfu.set_muted(m, &tid, false, now);
            None
        }
        ClientMessage::SubscribeTracks(r) => Some(frame(ServerMessage::SubscribeTracks(
            subscriptions(r, |p, tids| sfu.subscribe(m, p, tids, now)),
        ))),
        ClientMessage::UnsubscribeTracks(r) => Some(frame(ServerMessage::UnsubscribeTracks(
            subscriptions(r, |p, tids| sfu.unsubscribe(m, p, tids, now)),
        ))),
        // Handled by the signaling state machine; never passed on.
        ClientMessage::SetDisplayName(_) | ClientMessage::CustomEvent(_) => None,
    }
}

fn subscriptions(
    r: ConnectionsRequest,
    mut apply: impl FnMut(&str, &[String]) -> bool,
) -> SubscriptionReply {
    let mut reply = SubscriptionReply {
        successes: Vec::new(),
        failures: Vec::new(),
    };
    for c in r.connections {
        let ok = apply(&c.connection_id, &c.track_ids);
        let entry = ConnectionTracks {
            connection_id: c.connection_id,
            track_ids: c.track_ids,
        };
        if ok {
            reply.successes.push(entry);
        } else {
            reply.failures.push(entry);
        }
    }
    reply
}

pub(super) fn event(sink: &dyn MediaEvents, e: SfuEvent) {
    let conn = |m: &str| ConnectionId::new(m).ok();
    let space = |r: &str| SpaceId::new(r).ok();
    let event = match e {
        SfuEvent::SubOffer { member, sdp, .. } => conn(&member).map(|to| MediaEvent::Frame {
            to,
            frame: frame(ServerMessage::SubOffer(SfuDescription {
                sfu_id: sink.sfu_id().into(),
                sdp,
            })),
        }),
        SfuEvent::TrackPublished { room, member, tid } => match (space(&room), conn(&member)) {
            (Some(space), Some(member)) => Some(MediaEvent::TrackPublished { space, member, tid }),
            _ => None,
        },
        SfuEvent::TrackUnpublished { room, member, tid } => match (space(&room), conn(&member)) {
            (Some(space), Some(member)) => {
                Some(MediaEvent::TrackUnpublished { space, member, tid })
            }
            _ => None,
        },
        SfuEvent::PeerFailed { member, .. } => {
            tracing::info!(%member, "a peer connection failed; asking the client to reconnect");
            conn(&member).map(|member| MediaEvent::Reconnect { member })
        }
        SfuEvent::ActiveSpeakers { room, speakers } => space(&room).map(|space| {
            let tracks = speakers
                .into_iter()
                .map(|(m, tid)| SpeakingTrack {
                    connection_id: m.to_string(),
                    track_id: tid,
                })
                .collect();
            MediaEvent::ActiveSpeakers { space, tracks }
        }),
    };
    if let Some(e) = event {
        sink.media_event(e);
    }
}
