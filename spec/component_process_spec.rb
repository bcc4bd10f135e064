# frozen_string_literal: true

require_relative "spec_helper"
require "json"
require "open3"

# Components as `flowctl run` runs them: child processes with its environment, registering with
# a flowctl.v1 control plane (the gem's embedded one, and one built with the official grpc
# gem), serving their data through the registered endpoint, health over real HTTP (curl),
# /metrics through promtool, and SIGTERM: drained, STOPPING, unregistered, exit 0.
RSpec.describe "Flowctl::Component processes" do
  V1 = Flowctl::V1 unless defined?(V1)

  COMPONENTS = {
    source: <<~'RUBY',
      class Numbers < Flowctl::Component::Source
        info name: "numbers", version: "1.0.0", output_event_types: ["number"]
        def each_event(request)
          first, last = request.params.values_at("start_ledger", "end_ledger").map { |v| Integer(v || 0) }
          (first..(last.zero? ? nil : last)).each { |n| yield({ id: n.to_s, type: "number", payload: n.to_s }) }
        end
      end
      Numbers.run
    RUBY
    processor: <<~'RUBY',
      class Square < Flowctl::Component::Processor
        info name: "square", version: "1.0.0", input_event_types: ["number"], output_event_types: ["squared"]
        config :delay, Float, default: 0.0
        def process(event)
          sleep config[:delay] if config[:delay].positive?
          Flowctl::V1::Event.new(id: event.id, type: "squared", payload: (event.payload.to_i**2).to_s)
        end
      end
      Square.run
    RUBY
    consumer: <<~'RUBY'
      class Recorder < Flowctl::Component::Consumer
        info name: "recorder", version: "1.0.0", input_event_types: ["squared"]
        config :out_file, String, required: true
        config :delay, Float, default: 0.0
        def setup = (@out = File.open(config[:out_file], "a")).sync = true
        def consume(event)
          sleep config[:delay] if config[:delay].positive?
          @out.puts(event.id)
        end
      end
      Recorder.run
    RUBY
  }.freeze

  let(:procs) { [] }
  let(:clients) { [] }
  let(:tmp) { Dir.mktmpdir }

  after do
    procs.each(&:kill)
    clients.each(&:close)
    FileUtils.rm_rf(tmp)
  end

  def spawn_component(kind, env)
    ComponentProcess.start(COMPONENTS.fetch(kind), env).tap { |p| procs << p }
  end

  def client(klass, endpoint) = klass.new(endpoint, tls: false).tap { |c| clients << c }

  def curl(port, path)
    out, _, st = Open3.capture3("curl", "-s", "-m", time_limit(5).to_s, "-w", "\n%{http_code}", "http://127.0.0.1:#{port}#{path}")
    raise "curl failed" unless st.success?

    body, _, code = out.rpartition("\n")
    [Integer(code), body]
  end

  def wait_until(timeout = 10, message = "condition")
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + time_limit(timeout)
    until (v = yield)
      raise "timed out waiting for #{message}" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep 0.05
    end
    v
  end

  def event(i) = V1::Event.new(id: i.to_s, type: "number", payload: i.to_s)

  # Writes events 1, 2, ... on call until the component ends it; the thread's value is the count.
  def endless_writer(call)
    Thread.new do
      i = 0
      loop { call.write(event(i += 1)) }
    rescue StandardError
      i
    end
  end

  # Runs kind's data through endpoint the way the runner does; returns what came out.
  def exercise(kind, endpoint, env)
    case kind
    when :source
      client(V1::SourceClient, endpoint).stream_events(params: { "start_ledger" => "3", "end_ledger" => "6" }).map(&:payload)
    when :processor
      client(V1::ProcessorClient, endpoint).process([event(2), event(3)]).map(&:payload)
    when :consumer
      reply = client(V1::ConsumerClient, endpoint).consume([event(7), event(8)])
      [reply.events_consumed, File.read(env.fetch("OUT_FILE")).split]
    end
  end

  EXPECTED = { source: %w[3 4 5 6], processor: %w[4 9], consumer: [2, %w[7 8]] }.freeze
  TYPES = { source: [[], ["number"]], processor: [["number"], ["squared"]], consumer: [["squared"], []] }.freeze

  shared_examples "a component in a flowctl pipeline" do
    %i[source processor consumer].each do |kind|
      it "runs a #{kind} under flowctl run's environment: registers, serves, reports health, stops cleanly" do
        id = "#{kind}-1"
        env = ComponentProcess.flowctl_run_env(id: id, control_plane: cp_endpoint)
        env["OUT_FILE"] = File.join(tmp, "consumed") if kind == :consumer
        comp = spawn_component(kind, env)
        info = wait_until(15, "#{id} registered") { registered(id) }
        expect(info[:endpoint]).to match(/\A127\.0\.0\.1:\d+\z/)
        expect(info[:endpoint]).to eq("127.0.0.1:#{comp.port}")
        expect([info[:input_event_types], info[:output_event_types]]).to eq(TYPES[kind])
        expect(info[:type].to_s).to eq("COMPONENT_TYPE_#{kind.upcase}")

        expect(exercise(kind, info[:endpoint], env)).to eq(EXPECTED[kind])

        expect(wait_until(5, "ready") { curl(comp.health_port, "/ready").first == 200 }).to be(true)
        code, body = curl(comp.health_port, "/health")
        expect(code).to eq(200)
        expect(JSON.parse(body)).to include("status" => "HEALTHY", "ready" => true, "component" => id,
                                            "registered" => true)
        code, text = curl(comp.health_port, "/metrics")
        expect(code).to eq(200)
        out, st = Open3.capture2e("promtool", "check", "metrics", stdin_data: "#{text}\n")
        expect(st.success?).to be(true), out
        expect(text).to include(%(component="#{id}"))

        status = comp.term(:TERM)
        expect(status.exitstatus).to eq(0), comp.log
        expect(wait_until(5, "#{id} STOPPING and unregistered") { stopped_and_unregistered?(id) }).to be(true)
      end
    end
  end

  context "with the gem's embedded control plane (Flowctl::ControlPlane::Registry)" do
    before do
      unless Flowctl::ControlPlane::Registry.method_defined?(:register_component)
        skip "the embedded control plane does not serve flowctl.v1 yet (issue 13)"
      end
    end

    let!(:cp_server) do
      s = Flowctl::Server.new(port: 0, tls: false)
      s.handle(Flowctl::V1::ControlPlaneService, Flowctl::ControlPlane::Registry.new)
      s.start
      s
    end
    let(:cp_endpoint) { "127.0.0.1:#{cp_server.port}" }
    let(:cp_client) { client(V1::ControlPlaneClient, cp_endpoint) }

    after { cp_server.stop(grace: 0) }

    # flowctl run's readiness test: ListComponents (HEALTHY only) shows component.id == id
    def registered(id)
      c = cp_client.list_components(V1::ListComponentsRequest.new).components.find { |s| s.component.id == id }
      c && c.component.to_h
    end

    def stopped_and_unregistered?(id)
      cp_client.list_components(include_unhealthy: true).components.none? { |s| s.component.id == id }
    end

    it_behaves_like "a component in a flowctl pipeline"
  end

  context "with a control plane built with the official grpc gem" do
    let!(:cp) { V1ControlPlane.start }
    let(:cp_endpoint) { "127.0.0.1:#{cp.port}" }

    after { cp.kill }

    def registrations(cp, id) = cp.events("register").select { |e| e["service_id"] == id }

    # the ComponentInfo of the last registration (proto3 JSON), once a HEALTHY beat with the
    # standard metrics followed it
    def registered(id, plane = cp)
      reg = registrations(plane, id).last or return nil
      beat = plane.events("heartbeat").find { |h| h["service_id"] == id && h["status"] == "HEALTH_STATUS_HEALTHY" }
      return nil unless beat

      expect(beat["metrics"]).to include("events_received", "events_failed", "in_flight")
      c = reg["component"]
      { id: c["id"], endpoint: c["endpoint"], type: c["type"], input_event_types: c.fetch("inputEventTypes", []),
        output_event_types: c.fetch("outputEventTypes", []) }
    end

    def stopped_and_unregistered?(id)
      cp.events("heartbeat").any? { |h| h["service_id"] == id && h["status"] == "HEALTH_STATUS_STOPPING" } &&
        cp.events("unregister").any? { |e| e["service_id"] == id }
    end

    it_behaves_like "a component in a flowctl pipeline"

    it "keeps serving while the control plane is down at start, registers once it is up, and again after a restart" do
      port = ComponentProcess.free_port
      env = ComponentProcess.flowctl_run_env(id: "late", control_plane: "127.0.0.1:#{port}", interval: "1s")
      comp = spawn_component(:processor, env)
      endpoint = "127.0.0.1:#{comp.port}"
      expect(exercise(:processor, endpoint, env)).to eq(%w[4 9])
      expect(curl(comp.health_port, "/ready").first).to eq(503)
      late = V1ControlPlane.start(port: port)
      begin
        wait_until(10, "registration") { registrations(late, "late").any? }
        expect(wait_until(5, "ready") { curl(comp.health_port, "/ready").first == 200 }).to be(true)
        before = registrations(late, "late").size
        late.restart # forgets everything: the next beat gets "not found" and registers again
        wait_until(10, "registration after restart") { registrations(late, "late").size > before }
        expect(exercise(:processor, endpoint, env)).to eq(%w[4 9])
      ensure
        late.kill
      end
    end
  end

  describe "SIGTERM in the middle of a stream" do
    it "loses no event a processor acknowledged (replied to), and exits 0" do
      env = { "DELAY" => "0.001" }
      comp = spawn_component(:processor, env)
      call = client(V1::ProcessorClient, "127.0.0.1:#{comp.port}").process_stream
      writer = endless_writer(call)
      replies = []
      reader = Thread.new do
        while (r = call.read)
          replies << r
        end
      rescue Flowctl::RPCError => e
        e
      end
      wait_until(10, "replies") { replies.size > 50 }
      status = comp.term(:TERM)
      expect(reader.value).to be_a(Flowctl::Unavailable)
      writer.join
      expect(status.exitstatus).to eq(0)
      expect(replies.map { |r| Integer(r.id) }).to eq((1..replies.size).to_a)
      expect(replies.map(&:payload)).to eq((1..replies.size).map { |n| (n * n).to_s })
      m = comp.log.match(/stopped: received (\d+), emitted (\d+), failed (\d+), dropped (\d+)/)
      expect(m.captures.map(&:to_i)).to eq([replies.size, replies.size, 0, 0])
    end

    it "has a consumer answer exactly what it consumed, and exits 0" do
      out_file = File.join(tmp, "consumed")
      comp = spawn_component(:consumer, { "OUT_FILE" => out_file, "DELAY" => "0.001" })
      call = client(V1::ConsumerClient, "127.0.0.1:#{comp.port}").consume_stream
      writer = endless_writer(call)
      wait_until(10, "consumption") { File.exist?(out_file) && File.size(out_file) > 200 }
      status = comp.term(:TERM)
      writer.join
      reply = call.response
      expect(status.exitstatus).to eq(0)
      consumed = File.read(out_file).split.map(&:to_i)
      expect(reply.events_consumed).to eq(consumed.size)
      expect(consumed).to eq((1..consumed.size).to_a)
    end
  end
end
