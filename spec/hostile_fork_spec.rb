# frozen_string_literal: true

require "spec_helper"

# Issue 17: forking while a heartbeat targets a control plane served by this same process.
# The control plane cannot answer a beat while the forking thread holds the GVL; the beat
# used to be cancelled so that the fork could prepare gRPC (4-12 failed beats per 80 forks).
# Now the beat's thread steps out of gRPC while it waits, and the fork passes it by.
RSpec.describe "fork with a heartbeat to an in-process control plane" do
  it "forty forks cost no beat (at most one, cancelled when another thread is slow to leave gRPC on a loaded machine)" do
    server = Flowctl::Server.new(port: 0)
    server.handle(Flowctl::ControlPlane::Service, Flowctl::ControlPlane::Registry.new)
    port = server.start
    client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false, timeout: time_limit(5))
    hb = client.start_heartbeat(:processor, id: "p", interval: 0.01, register: { endpoint: "x" })
    sleep 0.2
    40.times do
      pid = fork { exit!(0) }
      Process.wait(pid)
      sleep 0.01
    end
    sent_before_stop = hb.stats[:sent]
    failed = hb.stats[:failed]
    hb.stop
    expect(sent_before_stop).to be > 20
    expect(failed).to be <= 1, hb.stats.inspect # it was 3-7
  ensure
    client&.close
    server&.stop(grace: 1)
  end
end
