# frozen_string_literal: true

require_relative "spec_helper"

# The heartbeat thread against the gem's own embedded control plane
# (Flowctl::ControlPlane::Registry served by Flowctl::Server), through a real
# Flowctl::ControlPlane::Client.
RSpec.describe "Flowctl::Heartbeat against the embedded control plane" do
  before do
    unless defined?(Flowctl::ControlPlane::Registry) && Flowctl::ControlPlane::Client.method_defined?(:channel)
      skip "needs Flowctl::Server, Flowctl::ControlPlane::Registry and Flowctl::ControlPlane::Client"
    end
  end

  let(:registry) { Flowctl::ControlPlane::Registry.new(ttl: 30) }
  let(:server) do
    @server = Flowctl::Server.new(port: 0, tls: false).tap { |s| s.handle(Flowctl::ControlPlane::Service, registry) }
  end
  let(:channel_args) { {"grpc.initial_reconnect_backoff_ms" => 100, "grpc.max_reconnect_backoff_ms" => 500} }
  let(:started) { [] }

  after do
    started.each { |hb| hb.stop(0) }
    @client&.close
    @server.stop(grace: 0) if @server&.running?
  end

  def client(port)
    @client ||= Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false, channel_args: channel_args)
  end

  def eventually(timeout = 5)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    until (v = yield)
      return v if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.02
    end
    v
  end

  def component(id)
    registry.components.find { |c| c.id == id }
  end

  it "registers, beats with metrics and status, and ends with STOPPING" do
    port = server.start
    hb = client(port).start_heartbeat(:processor, id: "ttp-1", interval: 0.1, metrics: {"events" => 1},
                                                  register: {endpoint: "127.0.0.1:9090", metadata: {"v" => "1"}})
    started << hb
    expect(eventually { component("ttp-1")&.heartbeats.to_i >= 2 }).to be_truthy
    c = component("ttp-1")
    expect([c.kind, c.endpoint, c.metadata, c.status, c.metrics]).to eq(
      [:processor, "127.0.0.1:9090", {"v" => "1"}, "HEALTHY", {"events" => 1.0}]
    )
    expect(c.reported_at).to be_within(1).of(Time.now)

    hb.metrics = {"events" => 99}
    hb.status = :UNHEALTHY
    expect(eventually { component("ttp-1").metrics == {"events" => 99.0} }).to be(true)
    expect(component("ttp-1").status).to eq("UNHEALTHY")

    hb.stop
    expect(component("ttp-1").status).to eq("STOPPING")
    expect(hb.stats).to include(registrations: 1, failed: 0)
  end

  it "does not count a beat its own stop cancelled as failed (a beat in flight when stop came)" do
    slow = Class.new(Flowctl::ControlPlane::Registry) do
      attr_reader :in_beat

      def processor_heartbeat(request, call = nil)
        @in_beat = true
        sleep 2 unless request.status.include?("STOPPING") # an ordinary beat waits: stop comes meanwhile
        super
      end
    end.new(ttl: 30)
    @server = Flowctl::Server.new(port: 0, tls: false).tap { |s| s.handle(Flowctl::ControlPlane::Service, slow) }
    port = @server.start
    hb = client(port).start_heartbeat(:processor, id: "ttp-stop", interval: 0.05, register: { endpoint: "127.0.0.1:9091" })
    started << hb
    expect(eventually { slow.in_beat }).to be(true)
    sleep 0.1 # the beat is in flight, its handler asleep
    hb.stop
    expect(hb.stats).to include(registrations: 1, failed: 0)
    expect(slow.components.find { |c| c.id == "ttp-stop" }.status).to eq("STOPPING")
  end

  it "starts from the FLOWCTL_* environment" do
    port = server.start
    env = {"ENABLE_FLOWCTL" => "true", "FLOWCTL_ENDPOINT" => "127.0.0.1:#{port}",
           "FLOWCTL_COMPONENT_ID" => "env-proc", "FLOWCTL_HEARTBEAT_INTERVAL" => "100ms"}
    hb = Flowctl::Heartbeat.from_env(:processor, env: env, register: {endpoint: "127.0.0.1:7000"})
    started << hb
    expect(hb.interval).to eq(0.1)
    expect(eventually { component("env-proc")&.heartbeats.to_i >= 2 }).to be_truthy
    expect(component("env-proc").endpoint).to eq("127.0.0.1:7000")
  end

  it "beats for each kind" do
    port = server.start
    %i[source consumer].each do |kind|
      started << client(port).start_heartbeat(kind, id: "#{kind}-1", interval: 0.1, register: {endpoint: "e"})
    end
    expect(eventually { registry.components.count { |c| c.heartbeats.to_i >= 1 } == 2 }).to be(true)
    expect(registry.components.map { |c| [c.kind, c.id] }.sort).to eq([[:consumer, "consumer-1"], [:source, "source-1"]])
  end

  it "registers again after the control plane restarts and forgot it" do
    port = server.start
    hb = client(port).start_heartbeat(:processor, id: "p", interval: 0.2, register: {endpoint: "e:1"})
    started << hb
    expect(eventually { component("p")&.heartbeats.to_i >= 1 }).to be_truthy
    server.stop(grace: 0)
    expect(eventually { hb.stats[:consecutive_failures] >= 1 }).to be(true)
    expect(hb.stats[:last_error]).to match(/ProcessorHeartbeat/)

    # a new, empty control plane on the same port
    fresh = Flowctl::ControlPlane::Registry.new(ttl: 30)
    again = Flowctl::Server.new(port: port, tls: false)
    again.handle(Flowctl::ControlPlane::Service, fresh)
    again.start
    back = Time.now
    begin
      expect(eventually { fresh.components.find { |c| c.id == "p" }&.heartbeats.to_i >= 1 }).to be_truthy
      expect(Time.now - back).to be < 2 * 0.2 + 0.5
      expect(fresh.components.first.endpoint).to eq("e:1")
      expect(hb.stats[:registrations]).to eq(2)
    ensure
      hb.stop(0)
      again.stop(grace: 0)
    end
  end
end
