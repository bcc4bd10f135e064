# frozen_string_literal: true

require_relative "spec_helper"
require "json"
require "open3"
require "socket"

# The HTTP health server on its own, over real HTTP (curl) and raw sockets.
RSpec.describe Flowctl::Component::HealthServer do
  # what a Runtime hands the server
  let(:report) { { status: "HEALTHY", ready: true, component: "p1", metrics: { "events_received" => 3 } } }
  let(:source) do
    r = -> { report }
    Struct.new(:health_report_proc) do
      def health_report = health_report_proc.call
      def prometheus_text = Flowctl::Component::Metrics.new.to_prometheus("p1")
    end.new(r)
  end
  let(:server) { described_class.new(source, port: 0) }
  let!(:port) { server.start }

  after { server.stop }

  def curl(path, *args)
    out, err, st = Open3.capture3("curl", "-s", "-m", time_limit(5).to_s, "-o", "-", "-w", "\n%{http_code} %{content_type}", *args,
                                  "http://127.0.0.1:#{port}#{path}")
    raise "curl failed: #{err}" unless st.success?

    body, _, tail = out.rpartition("\n")
    code, type = tail.split(" ", 2)
    [Integer(code), type, body]
  end

  def raw(bytes, read: true)
    s = TCPSocket.new("127.0.0.1", port)
    s.write(bytes)
    read ? s.read : s
  ensure
    s.close if read && s
  end

  it "answers /health, /ready and /live with JSON" do
    %w[/health /ready /live /health?verbose=1].each do |path|
      code, type, body = curl(path)
      expect(code).to eq(200), path
      expect(type).to eq("application/json")
      expect(JSON.parse(body)).to include("status" => "HEALTHY", "ready" => true, "component" => "p1",
                                          "metrics" => { "events_received" => 3 })
    end
  end

  it "answers 503 where the component is not ready or not healthy" do
    report[:ready] = false
    expect(curl("/ready").first).to eq(503)
    expect(curl("/health").first).to eq(200)
    report[:status] = "STOPPING"
    expect(curl("/health").first).to eq(503)
    expect(curl("/live").first).to eq(200)
    report[:status] = "DEGRADED"
    expect(curl("/health").first).to eq(200)
  end

  it "serves /metrics in the Prometheus text format, valid for promtool" do
    code, type, body = curl("/metrics")
    expect(code).to eq(200)
    expect(type).to eq("text/plain; version=0.0.4; charset=utf-8")
    out, st = Open3.capture2e("promtool", "check", "metrics", stdin_data: body + "\n")
    expect(st.success?).to be(true), out
  end

  it "answers HEAD without a body, 404 for other paths, 405 for other methods" do
    code, _, body = curl("/health", "-I")
    expect(code).to eq(200)
    expect(body).not_to include("{")
    expect(curl("/nope").first).to eq(404)
    expect(curl("/health", "-X", "POST", "-d", "x").first).to eq(405)
  end

  it "survives bad input and keeps serving" do
    expect(raw("garbage\r\n\r\n")).to start_with("HTTP/1.1 400")
    expect(raw("GET /health HTTP/1.1\r\n" + ("X: #{'a' * 100}\r\n" * 200) + "\r\n")).to start_with("HTTP/1.1 431")
    expect(raw("\x00\xff\xfe\r\n\r\n".b)).to start_with("HTTP/1.1 400")
    raw("GET /he", read: false).close # a client that leaves in the middle
    5.times { TCPSocket.new("127.0.0.1", port).close }
    expect(curl("/health").first).to eq(200)
  end

  it "times out a client that sends nothing, and serves others meanwhile" do
    slow = TCPSocket.new("127.0.0.1", port)
    expect(curl("/live").first).to eq(200)
    stub_const("#{described_class}::READ_TIMEOUT", 0.3) # only new connections read it
    slow2 = TCPSocket.new("127.0.0.1", port)
    expect(slow2.read).to start_with("HTTP/1.1 408")
    slow.close
    slow2.close
  end

  it "turns an exception of the report into a 500, not a dead server" do
    report[:status] = nil
    allow(source).to receive(:health_report).and_raise(RuntimeError, "boom")
    code, _, body = curl("/health")
    expect(code).to eq(500)
    expect(body).to include("boom")
    allow(source).to receive(:health_report).and_return(report.merge(status: "HEALTHY"))
    expect(curl("/health").first).to eq(200)
  end

  it "answers 503 past MAX_CONNECTIONS connections at once" do
    stub_const("#{described_class}::MAX_CONNECTIONS", 2)
    held = Array.new(2) { TCPSocket.new("127.0.0.1", port) }
    sleep 0.2
    expect(raw("GET /live HTTP/1.1\r\n\r\n")).to start_with("HTTP/1.1 503")
    held.each(&:close)
    sleep 0.1
    expect(curl("/live").first).to eq(200)
  end
end
