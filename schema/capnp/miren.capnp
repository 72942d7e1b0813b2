@0xd1933b7a4198bd4d;
# The wire contract between the `miren` CLI, runners and the coordinator.
#
# Every QUIC connection carries one bi-stream with a Cap'n Proto two-party
# RPC session. The coordinator's bootstrap capability is a `Cluster`; what it
# will hand out beyond `info` depends on the TLS identity of the peer, so an
# anonymous peer holds no reference through which it could reach admin methods.

struct ClusterInfo {
  name @0 :Text;
  version @1 :Text;
  issuerUrl @2 :Text;
  clusterId @3 :Text;
}

enum Role {
  anonymous @0;
  admin @1;
  runner @2;
}

struct ClusterStatus {
  info @0 :ClusterInfo;
  uptimeSecs @1 :UInt64;
  runners @2 :UInt32;
  apps @3 :UInt32;
  sandboxes @4 :UInt32;
  joinTokens @5 :UInt32;
  ciBindings @6 :UInt32;
  signingKeys @7 :UInt32;
}

struct SigningKey {
  kid @0 :Text;
  alg @1 :Text;
  state @2 :Text;
  createdUnix @3 :Int64;
  activatesUnix @4 :Int64;
  retiresUnix @5 :Int64;
}

interface Cluster {
  # Bootstrap capability of every connection.
  info @0 () -> (info :ClusterInfo);
  whoami @1 () -> (role :Role, subject :Text);
  ping @2 (payload :Data) -> (payload :Data);
  admin @3 () -> (admin :Admin);
  # Fails unless the peer presented the cluster's admin certificate.
}

interface Admin {
  status @0 () -> (status :ClusterStatus);
  mintWorkloadToken @1 (app :Text, sandboxId :Text, organization :Text,
                        audiences :List(Text), ttlSecs :UInt32) -> (token :Text);
  listSigningKeys @2 () -> (keys :List(SigningKey));
  rotateSigningKey @3 () -> (keys :List(SigningKey));
  verifyWorkloadToken @4 (token :Text, audience :Text) -> (claimsJson :Text);
  # Verifies a token of this cluster (current or recent issuer) the way an
  # outside verifier would; fails with the reason.
}
