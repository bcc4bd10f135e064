# frozen_string_literal: true

require "spec_helper"

# ProcessorService#Process as a true bidi stream, against the official grpc gem server.
RSpec.describe "Flowctl::Processor::Client#process (bidi) against the official grpc gem" do
  Official.load!

  def om = Obsrvr::Flow::Processor
  def dm = Flowctl::Processor::DataMessage

  before(:all) do
    @state = {} # shared by the examples (before(:all) ivars are copied shallowly)
    @seen = Queue.new
    @ended = Queue.new
    state = @state
    seen = @seen
    handler = OfficialServer::Handler.new(process: lambda { |reqs, call|
      seen << call.metadata.dup
      state[:behaviour].call(reqs, call)
    })
    @server = OfficialServer.new
    @port = @server.start(handler_for_processor: handler, tls: false)
  end

  after(:all) { @server&.stop }

  before do
    @seen.clear
    @ended.clear
    echo!
  end

  let(:client) { Flowctl::Processor::Client.new("127.0.0.1:#{@port}", tls: false) }

  after { client.close }

  # Echo each request as it arrives (so replies interleave with requests).
  def echo!(&tap)
    ended = @ended
    behave do |reqs, _call|
      Enumerator.new do |y|
        reqs.each do |r|
          tap&.call(r)
          y << r
        end
      ensure
        ended << true
      end
    end
  end

  def behave(&blk) = @state[:behaviour] = blk

  def msg(i, size = 8) = dm.new(payload: (i.to_s * size)[0, size].b, metadata: {"i" => i.to_s})

  it "streams every field both ways: binary payloads and metadata maps" do
    got = Queue.new
    echo! { |r| got << r }
    bin = (0..255).map(&:chr).join.b
    reqs = [dm.new(payload: bin, metadata: {"k" => "v", "ключ" => "значение"}), dm.new, dm.new(payload: "x" * 100_000)]
    replies = []
    call = client.process(reqs) { |r| replies << r }
    expect(replies).to eq(reqs)
    expect(replies[0].payload.encoding).to eq(Encoding::BINARY)
    seen = Array.new(3) { got.pop }
    expect(seen[0]).to be_a(om::DataMessage)
    expect(seen[0].payload).to eq(bin)
    expect(seen[0].metadata.to_h).to eq("k" => "v", "ключ" => "значение")
    expect(call.status).to eq(0)
    expect(call.trailing_metadata).to be_a(Hash)
    expect(call).to be_finished
  end

  it "reads replies while requests are still being written (each request waits for the previous reply)" do
    acks = Queue.new
    reqs = Enumerator.new do |y|
      10.times do |i|
        y << msg(i)
        OfficialServer.pop(acks, 5) or raise "no reply to request #{i} before the next one"
      end
    end
    got = []
    client.process(reqs) do |r|
      got << r.metadata["i"]
      acks << true
    end
    expect(got).to eq((0..9).map(&:to_s))
  end

  it "returns an Enumerator without a block (lazy, restartable, external iteration)" do
    e = client.process([msg(1), msg(2), msg(3)])
    expect(e).to be_a(Enumerator)
    expect(@seen).to be_empty
    expect(e.map { |r| r.metadata["i"] }).to eq(%w[1 2 3])
    expect(e.next.metadata["i"]).to eq("1")
    expect(e.next.metadata["i"]).to eq("2")
  end

  it "stops the writer and cancels the call when the block breaks early" do
    # the writer threads alive (not all threads: the official server's come and go)
    writers = -> { Thread.list.count { |t| t.name == "flowctl-writer" && t.alive? } }
    before = writers.call
    endless = Enumerator.new { |y| i = 0; loop { y << msg(i += 1) } }
    first = client.process(endless) { |r| break r }
    expect(first.metadata["i"]).to eq("1")
    expect(OfficialServer.pop(@ended, 5)).to be(true)
    expect(writers.call).to eq(before)
    expect(client.process([msg(7)]).to_a.size).to eq(1)
  end

  it "takes the first replies of an endless request stream through the Enumerator" do
    endless = Enumerator.new { |y| i = 0; loop { y << msg(i += 1) } }
    expect(client.process(endless).first(3).map { |r| r.metadata["i"] }).to eq(%w[1 2 3])
  end

  describe "the call object (process_stream)" do
    it "writes with write/<<, reads with read and each, half-closes with close_write" do
      call = client.process_stream(headers: {"x-stream" => "yes"})
      call.write(msg(1)) << msg(2)
      expect(call.read.metadata["i"]).to eq("1")
      call << {payload: "h", metadata: {"i" => "3"}}
      expect(call.close_write).to be(call)
      expect(call.close_write).to be(call) # idempotent
      expect(call.each.map { |r| r.metadata["i"] }).to eq(%w[2 3])
      expect(call.read).to be_nil
      expect(call.read).to be_nil
      expect(call.status).to eq(0)
      expect(call.error).to be_nil
      # an earlier example's call may reach the server late: skip its headers
      seen = nil
      3.times { break unless (seen = OfficialServer.pop(@seen, 5)) && !seen.key?("x-stream") }
      expect(seen).to include("x-stream" => "yes")
      expect { call << msg(4) }.to raise_error(IOError)
    end

    it "gives the server's initial and trailing metadata" do
      behave do |reqs, call|
        call.merge_metadata_to_send("x-initial" => "hello")
        call.output_metadata["x-trailing-bin"] = "\x01\x02".b
        Enumerator.new { |y| reqs.each { |r| y << r } }
      end
      call = client.process_stream
      call << msg(1)
      expect(call.initial_metadata).to include("x-initial" => "hello")
      call.close_write
      expect(call.to_a.size).to eq(1)
      expect(call.trailing_metadata).to include("x-trailing-bin" => "\x01\x02".b)
    end

    it "raises the server's error from read after the replies before it, with trailing metadata" do
      behave do |reqs, _call|
        Enumerator.new do |y|
          reqs.each_with_index do |r, i|
            raise GRPC::Aborted.new("stop at 2", {"x-why" => "because"}) if i == 2

            y << r
          end
        end
      end
      call = client.process_stream
      5.times { |i| call << msg(i) rescue nil } # writes may fail once the server has ended the call
      expect(call.read).to be_a(dm)
      expect(call.read).to be_a(dm)
      expect { call.read }.to raise_error(Flowctl::Aborted) { |e|
        expect(e.details).to eq("stop at 2")
        expect(e.metadata).to include("x-why" => "because")
      }
      expect { call.read }.to raise_error(Flowctl::Aborted) # every later read
      expect(call.status).to eq(10)
      expect(call.error).to be_a(Flowctl::Aborted)
      expect(call.trailing_metadata).to include("x-why" => "because")
      expect { call << msg(9) }.to raise_error(Flowctl::Aborted)
    end

    it "the block form cancels a call left open" do
      client.process_stream do |call|
        call << msg(1)
        expect(call.read).to be_a(dm)
      end
      expect(OfficialServer.pop(@ended, 5)).to be(true)
    end

    it "cancel wakes a reader blocked in another thread" do
      behave { |reqs, _call| reqs.each { nil }; [] } # reads, never answers
      call = client.process_stream
      reader = Thread.new { Thread.current.report_on_exception = false; call.read }
      sleep 0.2
      t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      call.cancel
      expect { reader.value }.to raise_error(Flowctl::Cancelled)
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t).to be < time_limit(0.1)
      expect(call.status).to eq(Flowctl::Cancelled::CODE)
    end

    it "applies a per-call timeout: as the stream deadline" do
      behave { |reqs, _call| reqs.each { nil }; [] }
      call = client.process_stream(timeout: 0.3)
      t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect { call.read }.to raise_error(Flowctl::DeadlineExceeded)
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t).to be_between(0.2, 1.0)
    end

    it "checks what it writes" do
      call = client.process_stream
      expect { call << "raw" }.to raise_error(TypeError, /DataMessage/)
      expect { call << {nope: 1} }.to raise_error(ArgumentError)
      expect { client.process_stream(headers: {"B A D" => "x"}) }.to raise_error(ArgumentError)
      expect { client.process(42) }.to raise_error(TypeError, /Enumerable/)
      call.cancel
    end
  end

  it "lets a slow reader and a fast writer run without deadlock (flow control both ways)" do
    big = "z" * 65_536
    n = ENV["GC_STRESS"] == "1" ? 40 : 200 # 13 MB each way, far beyond the HTTP/2 windows
    call = client.process_stream(timeout: 600)
    writer = Thread.new do
      n.times { |i| call << dm.new(payload: big, metadata: {"i" => i.to_s}) }
      call.close_write
      :done
    end
    sleep 0.5 # the reader is late: the writer must block on flow control, not fail
    count = 0
    call.each do |r|
      count += 1
      expect(r.payload.bytesize).to eq(65_536)
      sleep 0.001 if count < 20
    end
    expect(count).to eq(n)
    expect(writer.value).to eq(:done)
  end

  it "surfaces an error of the request Enumerable in the caller and cancels the call" do
    bad = Enumerator.new do |y|
      y << msg(1)
      raise KeyError, "no more input"
    end
    expect { client.process(bad) { |_r| nil } }.to raise_error(KeyError, "no more input")
    expect(OfficialServer.pop(@ended, 5)).to be(true)
  end

  it "many threads each run their own stream on one client" do
    results = Array.new(6) do |t|
      Thread.new { client.process(Array.new(50) { |i| msg("#{t}-#{i}") }).map { |r| r.metadata["i"] } }
    end.map(&:value)
    results.each_with_index { |r, t| expect(r).to eq(Array.new(50) { |i| "#{t}-#{i}" }) }
  end

  it "cancels streams that are garbage collected while open" do
    20.times do
      call = client.process_stream
      call << msg(1)
      call.read
    end
    GC.start
    GC.start
    ended = 0
    deadline = Time.now + 5
    ended += 1 while ended < 20 && OfficialServer.pop(@ended, [deadline - Time.now, 0].max)
    expect(ended).to eq(20)
    expect(client.process([msg(1)]).to_a.size).to eq(1)
  end
end
