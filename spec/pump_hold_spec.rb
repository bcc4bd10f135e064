# frozen_string_literal: true

require "spec_helper"
require "timeout"

# A burst's messages that find no send in flight wait for the next ones (pump.c, enqueue_locked)
# and leave when the writer waits on the stream, or when the driver looks once the writer has
# stopped writing. A writer that writes a burst and then leaves the stream alone (its handler
# busy elsewhere, the call still open) must not strand them: each arrives while the writer
# still sleeps, in order.
RSpec.describe "Flowctl streams: messages a burst held back" do
  let(:v1) { Flowctl::V1 }

  before(:all) do
    @pause = Queue.new
    pause = @pause
    handler = Object.new
    # Writes params["n"] events back to back, then sleeps until the example lets it go.
    handler.define_singleton_method(:stream_events) do |req, call|
      Integer(req.params["n"]).times { |i| call.write(Flowctl::V1::Event.new(id: "h#{i}", type: "t")) }
      pause.pop
      nil
    end
    @server = Flowctl::Server.new(port: 0, tls: false, pool_size: 4)
    @server.handle(Flowctl::V1::SourceService, handler)
    @port = @server.start
  end

  after(:all) do
    8.times { @pause << true }
    @server&.stop(grace: 1)
  end

  let(:client) { v1::SourceClient.new("127.0.0.1:#{@port}", tls: false) }

  after { client.close }

  [1, 2, 3, 5, 9].each do |n|
    it "delivers a burst of #{n} while the writer sleeps with the call open" do
      events = client.stream_events(v1::StreamRequest.new(params: { "n" => n.to_s }))
      got = Timeout.timeout(time_limit(5)) { Array.new(n) { events.next.id } }
      expect(got).to eq(Array.new(n) { |i| "h#{i}" })
      @pause << true
      expect { Timeout.timeout(time_limit(5)) { events.next } }.to raise_error(StopIteration)
    end
  end

  it "delivers bursts written between reads of a bidi stream, in order" do
    srv = Flowctl::Server.new(port: 0, tls: false, pool_size: 2)
    echo = Object.new
    def echo.process(events, call) = events.each { |e| 3.times { |k| call.write(Flowctl::V1::Event.new(id: "#{e.id}.#{k}")) } }
    srv.handle(Flowctl::V1::ProcessorService, echo)
    port = srv.start
    proc_client = v1::ProcessorClient.new("127.0.0.1:#{port}", tls: false)
    n = ENV["GC_STRESS"] == "1" || ENV["FLOWCTL_MEMCHECK"] ? 20 : 200
    ids = Timeout.timeout(time_limit(10)) do
      proc_client.process(Array.new(n) { |i| v1::Event.new(id: i.to_s) }).map(&:id)
    end
    expect(ids).to eq(Array.new(n) { |i| Array.new(3) { |k| "#{i}.#{k}" } }.flatten)
  ensure
    proc_client&.close
    srv&.stop(grace: 1)
  end
end
