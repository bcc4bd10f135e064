# frozen_string_literal: true

require "spec_helper"
require "open3"
require "rbconfig"

# exe/flowctl-controlplane: serves the embedded control plane, prints the component table,
# exits cleanly on SIGINT.
RSpec.describe "exe/flowctl-controlplane" do
  before(:all) { Official.load! }

  exe = File.expand_path("../exe/flowctl-controlplane", __dir__)
  lib = File.expand_path("../lib", __dir__)
  define_method(:run_exe) { |*args| Open3.popen3(RbConfig.ruby, "-I#{lib}", exe, *args) }

  # Reads stdout lines until one matches (or the process ends / time runs out).
  def read_until(out, pattern, seen, limit: ENV["GC_STRESS"] ? 120 : 10)
    deadline = Time.now + limit
    while Time.now < deadline
      break unless IO.select([out], nil, nil, deadline - Time.now)

      line = out.gets or break
      seen << line
      return line if line.match?(pattern)
    end
    nil
  end

  it "serves the control plane, shows registered components, and stops on SIGINT" do
    stdin, out, err, wait = run_exe("--port", "0", "--interval", "0.2", "--ttl", "60", "--token", "T")
    seen = []
    banner = read_until(out, /listening on/, seen)
    expect(banner).to match(/listening on 127\.0\.0\.1:\d+ \(.*plaintext, bearer token required, heartbeat ttl 60.0s, janitor every 10.0s, no persistence\)/), seen.join
    port = Integer(banner[/127\.0\.0\.1:(\d+)/, 1])
    cp = Obsrvr::Flow::Controlplane
    stub = cp::ControlPlane::Stub.new("127.0.0.1:#{port}", :this_channel_is_insecure, timeout: 5)
    expect { stub.register_source(cp::RegisterSourceRequest.new(source_id: "s1")) }.to raise_error(GRPC::Unauthenticated)
    auth = { metadata: { "authorization" => "Bearer T" } }
    stub.register_source(cp::RegisterSourceRequest.new(source_id: "ledger-source", endpoint: "127.0.0.1:7001"), **auth)
    stub.source_heartbeat(cp::SourceHeartbeatRequest.new(source_id: "ledger-source", status: "HEALTHY",
                                                         metrics: { "ledgers" => 12.0 }), **auth)
    row = read_until(out, /ledger-source/, seen)
    expect(row.split.values_at(0, 1, 2, 3, 4)).to eq(%w[source seed ledger-source 127.0.0.1:7001 HEALTHY])
    expect(row).to include("ledgers=12")
    Process.kill("INT", wait.pid)
    expect(read_until(out, /stopping/, seen)).not_to be_nil
    rest = out.read
    expect(wait.value.success?).to be(true), err.read
    expect(rest).to include("ledger-source")
  ensure
    [stdin, out, err].each { |io| io&.close unless io&.closed? }
    stop_child(wait)
  end

  def stop_child(wait)
    return unless wait&.alive?

    begin
      Process.kill("KILL", wait.pid)
    rescue Errno::ESRCH
      nil # it ended meanwhile
    end
    wait.join
  end

  it "takes --db, --heartbeat-ttl and --janitor-interval as upstream's server does, and prints hostile names escaped" do
    require "tmpdir"
    Dir.mktmpdir do |dir|
      db = File.join(dir, "cp.db")
      evil = "evil\n\e[2J\u0000id"
      2.times do |round|
        stdin, out, err, wait = run_exe("--port", "0", "--interval", "0.1", "--db", db, "--heartbeat-ttl", "300ms",
                                        "--janitor-interval", "100ms", "--rows", "5")
        seen = []
        banner = read_until(out, /listening on/, seen)
        expect(banner).to include("(flowctl.v1 + seed, plaintext, heartbeat ttl 0.3s, janitor every 0.1s, db #{db} (#{round * 2} components)"), -> { seen.join }
        if round.zero?
          port = Integer(banner[/127\.0\.0\.1:(\d+)/, 1])
          cp = Obsrvr::Flow::Controlplane
          stub = cp::ControlPlane::Stub.new("127.0.0.1:#{port}", :this_channel_is_insecure, timeout: 5)
          stub.register_processor(cp::RegisterProcessorRequest.new(processor_id: evil, endpoint: "h:1"))
          stub.processor_heartbeat(cp::ProcessorHeartbeatRequest.new(processor_id: evil, status: "HEALTHY",
                                                                     metrics: { "x" => Float::NAN }))
          v1 = Class.new(Flowctl::Client) { use_service Flowctl::V1::ControlPlaneService }.new("127.0.0.1:#{port}", tls: false, timeout: time_limit(10))
          reply = v1.register_component(component: { id: "v1-source", type: :COMPONENT_TYPE_SOURCE, endpoint: "h:2",
                                                      output_event_types: ["ledger"] })
          expect(reply.connection_info).to eq("control_plane_endpoint" => "127.0.0.1:#{port}")
          v1.close
        end
        row = read_until(out, /evil.*UNHEALTHY \(stale\)/, seen) # the janitor's verdict after 300 ms without a heartbeat
        expect(row).to include('evil\n\e[2J\x00id', "x=NaN"), seen.join
        expect(read_until(out, /v1-source/, seen).split.values_at(0, 1, 2, 3)).to eq(%w[source v1 v1-source h:2])
        Process.kill("INT", wait.pid)
        rest = out.read
        expect(wait.value.success?).to be(true), err.read
        expect(seen.join + rest).not_to match(/[\x00\e]/)
      ensure
        [stdin, out, err].each { |io| io&.close unless io&.closed? }
        stop_child(wait)
      end
    end
  end

  it "refuses plaintext on a non-loopback host unless asked, and bad options" do
    _, err, status = Open3.capture3(RbConfig.ruby, "-I#{lib}", exe, "--host", "0.0.0.0", "--port", "0")
    expect(status.success?).to be(false)
    expect(err).to include("0.0.0.0 is not a loopback address: pass --plaintext, or --tls-cert and --tls-key")
    _, err, status = Open3.capture3(RbConfig.ruby, "-I#{lib}", exe, "--port", "x")
    expect(status.success?).to be(false)
    expect(err).to include("invalid argument: --port x")
    _, err, status = Open3.capture3(RbConfig.ruby, "-I#{lib}", exe, "--heartbeat-ttl", "soon")
    expect(status.success?).to be(false)
    expect(err).to include('--heartbeat-ttl: "soon" is not a duration')
    out, _, status = Open3.capture3(RbConfig.ruby, "-I#{lib}", exe, "--help")
    expect(status.success?).to be(true)
    expect(out).to include("usage: flowctl-controlplane")
  end
end
